package timer

// The transport: one connection, calls pipelined on it and matched to their
// replies by order (the protocol has no request ids), and event frames handed
// to subscriptions. One goroutine reads; callers write under a lock.

import (
	"bufio"
	"context"
	"crypto/tls"
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"net"
	"strings"
	"sync"
)

// Return codes of the frames a server sends.
const (
	retOK      = 0  // a reply: one CBOR item
	retError   = 1  // an error reply: UTF-8 text
	retEvent   = 16 // an event, only after events.subscribe
	retDropped = 17 // a drop or gap notice, only after events.subscribe
	retNotice  = 18 // the close notice, only after server.goaway
)

// askNotice is the server.goaway request, {} as its payload: ask for the close notice.
var askNotice = []byte("\x00\x00\x00\x0dserver.goaway\x00\x00\x00\x01\xa0")

// DefaultMaxFrameSize is the largest reply or event body read by default,
// the server's own default limit.
const DefaultMaxFrameSize = 1 << 20

// DefaultEventQueue is how many events a subscription holds by default
// for a reader that has not caught up; older ones are dropped and counted.
const DefaultEventQueue = 1024

// Option configures Dial.
type Option func(*options)

type options struct {
	tls        *tls.Config
	maxFrame   uint32
	eventQueue int
	notice     bool
}

// WithTLS sets the TLS configuration of a tls: address. Without it the
// system's roots are trusted and the server name is the address's host.
func WithTLS(config *tls.Config) Option { return func(o *options) { o.tls = config } }

// WithMaxFrameSize caps the body of a reply or event; a larger one closes the connection.
func WithMaxFrameSize(n uint32) Option { return func(o *options) { o.maxFrame = n } }

// WithEventQueue sets how many events each subscription holds for a slow reader.
func WithEventQueue(n int) Option { return func(o *options) { o.eventQueue = max(n, 1) } }

// WithCloseNotice asks the server, first thing on the connection, to say so
// before a graceful close (server.goaway). A call that then has no reply
// fails with a *ClosedError wrapping ErrNotStarted: the server never read
// it, so it is safe to send again. A server without the extension refuses
// the ask, and the client carries on without the promise. Without this
// option the client sends the base protocol only, byte for byte.
func WithCloseNotice() Option { return func(o *options) { o.notice = true } }

// Client is a connection to a timer server. Its methods are safe for
// concurrent use: calls from many goroutines are pipelined on the one
// connection, and each reply goes to its own call.
type Client struct {
	nc      net.Conn
	opts    options
	writeMu sync.Mutex // one frame at a time, in the order of pending

	mu      sync.Mutex
	pending []*slot                    // calls sent, oldest first
	subs    map[*Subscription]struct{} // open subscriptions
	closing bool                       // Shutdown began: no new calls
	idle    chan struct{}              // closed when pending empties during Shutdown
	err     *ClosedError               // why the connection ended; nil while open
	done    chan struct{}              // closed when the reader has stopped

	granted bool // the server promised the close notice; the reader's alone
}

type slot struct {
	reply chan frame // buffered: the reader never waits for a caller that gave up
	ask   bool       // server.goaway's: not a call, its reply is the reader's
}

type frame struct {
	ret  int32
	body []byte
	err  error
}

// Dial connects to a timer server at tcp:HOST:PORT, tls:HOST:PORT or
// unix:PATH. The context bounds the connect only (and, with WithCloseNotice,
// sending the ask).
func Dial(ctx context.Context, address string, opts ...Option) (*Client, error) {
	o := options{maxFrame: DefaultMaxFrameSize, eventQueue: DefaultEventQueue}
	for _, opt := range opts {
		opt(&o)
	}
	scheme, rest, _ := strings.Cut(address, ":")
	var dialer net.Dialer
	var nc net.Conn
	var err error
	switch scheme {
	case "tcp", "unix":
		nc, err = dialer.DialContext(ctx, scheme, rest)
	case "tls":
		config := &tls.Config{}
		if o.tls != nil {
			config = o.tls.Clone()
		}
		if config.ServerName == "" {
			config.ServerName, _, _ = net.SplitHostPort(rest)
		}
		nc, err = (&tls.Dialer{NetDialer: &dialer, Config: config}).DialContext(ctx, "tcp", rest)
	default:
		err = errors.New("expected tcp:HOST:PORT, tls:HOST:PORT or unix:PATH")
	}
	if err != nil {
		return nil, &ConnectError{Address: address, Err: err}
	}
	c := &Client{nc: nc, opts: o, subs: map[*Subscription]struct{}{}, done: make(chan struct{})}
	if o.notice {
		c.pending = append(c.pending, &slot{reply: make(chan frame, 1), ask: true})
		deadline, _ := ctx.Deadline()
		_ = nc.SetWriteDeadline(deadline)
		if _, err := nc.Write(askNotice); err != nil {
			_ = nc.Close()
			return nil, &ConnectError{Address: address, Err: err}
		}
	}
	go c.read()
	return c, nil
}

// call sends one request and waits for its reply, decoded into a CBOR item.
func (c *Client) call(ctx context.Context, method string, payload *encoder) (any, error) {
	if payload.err != nil {
		return nil, fmt.Errorf("%s: invalid request: %w", method, payload.err)
	}
	if err := ctx.Err(); err != nil {
		return nil, contextError(method, err)
	}
	s := &slot{reply: make(chan frame, 1)}
	out := binary.BigEndian.AppendUint32(make([]byte, 0, 8+len(method)+len(payload.buf)), uint32(len(method)))
	out = binary.BigEndian.AppendUint32(append(out, method...), uint32(len(payload.buf)))
	out = append(out, payload.buf...)

	c.writeMu.Lock()
	c.mu.Lock()
	if c.err != nil || c.closing {
		err := c.err
		c.mu.Unlock()
		c.writeMu.Unlock()
		if err == nil {
			err = &ClosedError{Reason: "the client is shutting down"}
		}
		return nil, err
	}
	c.pending = append(c.pending, s)
	c.mu.Unlock()
	deadline, _ := ctx.Deadline() // zero: none
	_ = c.nc.SetWriteDeadline(deadline)
	_, err := c.nc.Write(out)
	c.writeMu.Unlock()
	if err != nil { // a frame sent in part cannot be taken back: the stream is lost
		c.fail("a request could not be sent", err)
	}

	var f frame
	select {
	case f = <-s.reply:
	case <-ctx.Done():
		return nil, contextError(method, ctx.Err()) // the reader drops the late reply
	}
	switch {
	case f.err != nil:
		return nil, f.err
	case f.ret == retError:
		return nil, &RemoteError{Method: method, Message: string(f.body)}
	}
	item, err := decodeItem(f.body)
	if err != nil {
		return nil, &InvalidReplyError{Method: method, Reason: err.Error()}
	}
	return item, nil
}

// invoke is call with the reply read into the method's result type.
func invoke[T any](ctx context.Context, c *Client, method string, e *encoder, read func(any, string) (T, error)) (T, error) {
	var out T
	item, err := c.call(ctx, method, e)
	if err == nil {
		if out, err = read(item, ""); err != nil {
			err = &InvalidReplyError{Method: method, Reason: err.Error()}
		}
	}
	return out, err
}

func (c *Client) read() {
	defer close(c.done)
	r := bufio.NewReaderSize(c.nc, 64<<10)
	var head [8]byte
	for {
		if _, err := io.ReadFull(r, head[:]); err != nil {
			c.fail("the connection ended", err)
			return
		}
		ret, size := int32(binary.BigEndian.Uint32(head[:4])), binary.BigEndian.Uint32(head[4:])
		if size > c.opts.maxFrame {
			c.fail(fmt.Sprintf("a frame of %d bytes is over the limit of %d", size, c.opts.maxFrame), nil)
			return
		}
		body := make([]byte, size)
		if _, err := io.ReadFull(r, body); err != nil {
			c.fail("the connection ended inside a frame", err)
			return
		}
		switch ret {
		case retOK, retError:
			if !c.answer(frame{ret: ret, body: body}) {
				c.fail("a reply came with no call waiting for it", nil)
				return
			}
		case retEvent, retDropped:
			c.event(ret, body)
		case retNotice:
			if c.granted { // else not ours to read: skipped, as any unknown code
				c.notice(body)
				return
			}
		default:
			// Not a reply: a code this client does not know (a newer server's
			// progress frame, say) never takes a call's place, so it is skipped.
		}
	}
}

// answer hands a reply to the oldest call; false when no call is waiting.
func (c *Client) answer(f frame) bool {
	c.mu.Lock()
	if len(c.pending) == 0 {
		c.mu.Unlock()
		return false
	}
	s := c.pending[0]
	c.pending[0] = nil
	c.pending = c.pending[1:]
	if len(c.pending) == 0 && c.idle != nil {
		close(c.idle)
		c.idle = nil
	}
	c.mu.Unlock()
	if s.ask { // granted whatever the body says: keys may be added
		c.granted = f.ret == retOK
	}
	s.reply <- f
	return true
}

// fail ends the connection once: every waiting call and subscription gets why.
func (c *Client) fail(reason string, err error) {
	if errors.Is(err, io.EOF) {
		reason, err = "the server closed the connection", nil
	}
	closed := &ClosedError{Reason: reason, Err: err}
	c.end(closed, closed)
}

// notice ends the connection on the close notice: the server read nothing
// after its last reply, so every call still waiting never started.
func (c *Client) notice(body []byte) {
	reason := "the server is closing the connection"
	if v, err := decodeItem(body); err == nil { // any body: the frame is the promise
		if m, ok := v.(map[string]any); ok {
			if text, ok := m["reason"].(string); ok && text != "" {
				reason = text
			}
		}
	}
	reason = "closed by the server (" + reason + ")"
	c.end(&ClosedError{Reason: reason, Err: ErrNotStarted}, &ClosedError{Reason: reason})
}

// end ends the connection once: calls waiting and later get calls, and
// subscriptions get subs.
func (c *Client) end(calls, subs *ClosedError) {
	c.mu.Lock()
	if c.err != nil {
		c.mu.Unlock()
		return
	}
	c.err = calls
	pending, open := c.pending, c.subs
	c.pending, c.subs = nil, nil
	if c.idle != nil {
		close(c.idle)
		c.idle = nil
	}
	c.mu.Unlock()
	_ = c.nc.Close()
	for _, s := range pending {
		s.reply <- frame{err: calls}
	}
	for s := range open {
		s.end(subs)
	}
}

// Close closes the connection at once. Calls still waiting fail with a
// *ClosedError: a call already sent may have run on the server.
func (c *Client) Close() error {
	c.fail("closed by this client", nil)
	<-c.done
	return nil
}

// Shutdown closes the connection gracefully: no new call starts, calls
// already sent get their replies, then the connection closes. If ctx ends
// first, the connection is closed at once and ctx's error returned.
func (c *Client) Shutdown(ctx context.Context) error {
	c.mu.Lock()
	c.closing = true
	var idle chan struct{}
	if len(c.pending) > 0 && c.err == nil {
		idle = make(chan struct{})
		c.idle = idle
	}
	c.mu.Unlock()
	var err error
	if idle != nil {
		select {
		case <-idle:
		case <-ctx.Done():
			err = ctx.Err()
		}
	}
	_ = c.Close()
	return err
}

// Closed is closed when the connection has ended, for whatever reason.
func (c *Client) Closed() <-chan struct{} { return c.done }

// InFlight is how many calls have been sent and await their replies,
// those whose callers gave up included.
func (c *Client) InFlight() int {
	c.mu.Lock()
	defer c.mu.Unlock()
	if len(c.pending) > 0 && c.pending[0].ask { // sent first, so first while unanswered
		return len(c.pending) - 1
	}
	return len(c.pending)
}
