package timer

import (
	"context"
	"errors"
	"fmt"
	"sync"
)

// Item is one thing a Subscription yields: an event of the API (such as
// OnEchoFired), Dropped, Gap or UnknownEvent. Use a type switch.
type Item interface{ isItem() }

// Dropped says that Count events were lost here: this reader fell behind,
// or the server dropped them for a connection that was not reading.
type Dropped struct {
	Count int64
}

// Gap says that events may have been lost, how many is unknown: the server
// lost the bus it shares events through. Reason says why.
type Gap struct {
	Reason string
}

// UnknownEvent is an event of a kind this client was generated without: a
// newer server's. Data is its payload as decoded CBOR (maps, slices, int64,
// string, ...). It is yielded, not dropped, so a reader can log or count it.
type UnknownEvent struct {
	Name string
	Data any
}

func (Dropped) isItem()      {}
func (Gap) isItem()          {}
func (UnknownEvent) isItem() {}

// ErrSubscriptionClosed is what Next returns after the subscription's Close.
var ErrSubscriptionClosed = errors.New("timer: subscription closed")

// Subscription receives events; Next yields them in order. Items arrive
// while no Next is waiting too, up to the queue size (WithEventQueue);
// beyond it the oldest are dropped and a Dropped item says how many.
type Subscription struct {
	c     *Client
	names map[string]bool // nil: every event

	mu      sync.Mutex
	queue   []entry
	dropped int64  // lost from the queue's head, not yet reported
	gap     string // a gap notice lost from the queue's head, not yet reported
	ended   error
	wake    chan struct{}
}

type entry struct {
	item Item
	err  error
}

// Subscribe asks the server for the events named, or for every event when
// none are, and returns the subscription that receives them.
func (c *Client) Subscribe(ctx context.Context, names ...string) (*Subscription, error) {
	s := &Subscription{c: c, wake: make(chan struct{}, 1)}
	e := &encoder{}
	if len(names) == 0 {
		e.object(0)
	} else {
		s.names = map[string]bool{}
		e.object(1)
		e.text("events")
		e.array(len(names))
		for _, name := range names {
			s.names[name] = true
			e.text(name)
		}
	}
	c.mu.Lock()
	if c.err != nil {
		c.mu.Unlock()
		return nil, c.err
	}
	c.subs[s] = struct{}{} // before the request: events may precede its reply
	c.mu.Unlock()
	if _, err := c.call(ctx, "events.subscribe", e); err != nil {
		c.drop(s)
		return nil, err
	}
	return s, nil
}

// Next returns the next item, waiting for one until ctx ends. After the
// connection ends it returns the items still held, then the *ClosedError.
// An event it cannot read gives an *InvalidReplyError; the subscription goes on.
func (s *Subscription) Next(ctx context.Context) (Item, error) {
	for {
		s.mu.Lock()
		switch {
		case s.gap != "":
			gap := Gap{Reason: s.gap}
			s.gap = ""
			s.mu.Unlock()
			return gap, nil
		case s.dropped > 0:
			n := s.dropped
			s.dropped = 0
			s.mu.Unlock()
			return Dropped{Count: n}, nil
		case len(s.queue) > 0:
			e := s.queue[0]
			s.queue[0] = entry{}
			s.queue = s.queue[1:]
			s.mu.Unlock()
			return e.item, e.err
		case s.ended != nil:
			s.mu.Unlock()
			return nil, s.ended
		}
		s.mu.Unlock()
		select {
		case <-s.wake:
		case <-ctx.Done():
			return nil, ctx.Err()
		}
	}
}

// Close ends the subscription and discards what it holds; Next then returns
// ErrSubscriptionClosed. The last one on a connection asks the server to stop
// sending events (events.unsubscribe).
func (s *Subscription) Close(ctx context.Context) error {
	s.mu.Lock()
	s.queue, s.dropped, s.gap = nil, 0, ""
	s.mu.Unlock()
	s.end(ErrSubscriptionClosed)
	if s.c.drop(s) {
		_, err := s.c.call(ctx, "events.unsubscribe", &encoder{buf: []byte{0xa0}})
		return err
	}
	return nil
}

// drop forgets s; true when it was the connection's last subscription.
func (c *Client) drop(s *Subscription) bool {
	c.mu.Lock()
	defer c.mu.Unlock()
	if _, ok := c.subs[s]; !ok {
		return false
	}
	delete(c.subs, s)
	return len(c.subs) == 0 && c.err == nil
}

func (s *Subscription) push(e entry) {
	s.mu.Lock()
	if s.ended == nil {
		if len(s.queue) >= s.c.opts.eventQueue {
			switch old := s.queue[0].item.(type) {
			case Dropped:
				s.dropped += old.Count
			case Gap:
				s.gap = old.Reason
			default:
				s.dropped++
			}
			s.queue[0] = entry{}
			s.queue = s.queue[1:]
		}
		s.queue = append(s.queue, e)
	}
	s.mu.Unlock()
	s.signal()
}

func (s *Subscription) end(err error) {
	s.mu.Lock()
	if s.ended == nil {
		s.ended = err
	}
	s.mu.Unlock()
	s.signal()
}

func (s *Subscription) signal() {
	select {
	case s.wake <- struct{}{}:
	default:
	}
}

// event decodes an event frame and hands it to the subscriptions that want it.
func (c *Client) event(ret int32, body []byte) {
	name, e := readFrame(ret, body)
	c.mu.Lock()
	subs := make([]*Subscription, 0, len(c.subs))
	for s := range c.subs {
		if name == "" || s.names == nil || s.names[name] {
			subs = append(subs, s)
		}
	}
	c.mu.Unlock()
	for _, s := range subs {
		s.push(e)
	}
}

// readFrame reads a ret 16 or 17 body: the event's name ("" for a notice) and its item.
func readFrame(ret int32, body []byte) (string, entry) {
	v, err := decodeItem(body)
	var m map[string]any
	if err == nil {
		m, err = readObject(v, "")
	}
	if ret == retDropped {
		var count int64
		var gap *string
		if err == nil {
			if count, err = readRequired(m, "dropped", "", readInt); err == nil {
				gap, err = readOptional(m, "gap", "", readText)
			}
		}
		switch {
		case err != nil: // events may have been lost: say so rather than nothing
			return "", entry{item: Gap{Reason: "unreadable drop notice: " + err.Error()}}
		case gap != nil:
			return "", entry{item: Gap{Reason: *gap}}
		}
		return "", entry{item: Dropped{Count: count}}
	}
	var name string
	if err == nil {
		name, err = readRequired(m, "event", "", readText)
	}
	if err != nil {
		return "", entry{err: &InvalidReplyError{Method: "event", Reason: err.Error()}}
	}
	read, known := events[name]
	if !known {
		return name, entry{item: UnknownEvent{Name: name, Data: m["data"]}}
	}
	item, err := readRequired(m, "data", "", read)
	if err != nil {
		return name, entry{err: &InvalidReplyError{Method: fmt.Sprintf("event %s", name), Reason: err.Error()}}
	}
	return name, entry{item: item}
}
