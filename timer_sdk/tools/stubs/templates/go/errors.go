package timer

import (
	"context"
	"errors"
	"fmt"
)

// RemoteError is an error reply: the server refused or failed the call.
// The connection stays usable.
type RemoteError struct {
	Method  string // the method called
	Message string // the server's message, as it sent it
}

func (e *RemoteError) Error() string { return e.Method + ": " + e.Message }

// TimeoutError is a call whose context deadline passed before its reply came.
// The late reply is read and dropped when it comes, so later calls are unaffected.
// errors.Is(err, context.DeadlineExceeded) holds for it.
type TimeoutError struct {
	Method string // the method called
}

func (e *TimeoutError) Error() string { return e.Method + ": no reply before the deadline" }

// Unwrap returns context.DeadlineExceeded.
func (e *TimeoutError) Unwrap() error { return context.DeadlineExceeded }

// InvalidReplyError is a reply or event this client cannot read: not one CBOR
// item, or a known field of the wrong type or out of range. Fields this client
// does not know are ignored, never an error.
type InvalidReplyError struct {
	Method string // the method called, or "event NAME" for an event
	Reason string // what was wrong, naming the field
}

func (e *InvalidReplyError) Error() string { return e.Method + ": invalid reply: " + e.Reason }

// ClosedError is a call on a connection that is closed, or that was lost
// while the call waited for its reply. A call that was sent before the loss
// may have run on the server, unless the error wraps ErrNotStarted.
type ClosedError struct {
	Reason string // why the connection ended
	Err    error  // the underlying error, if any
}

func (e *ClosedError) Error() string {
	if e.Err != nil {
		return fmt.Sprintf("connection closed: %s: %v", e.Reason, e.Err)
	}
	return "connection closed: " + e.Reason
}

// Unwrap returns the underlying error, if any.
func (e *ClosedError) Unwrap() error { return e.Err }

// ErrNotStarted is what a *ClosedError wraps when the server closed the
// connection gracefully before it read the call, and said so (the close
// notice, WithCloseNotice): the call never started, and is safe to send
// again, even a call with effects. Test for it with errors.Is.
var ErrNotStarted = errors.New("the server never read this call: it never started, and is safe to send again")

func contextError(method string, err error) error {
	if err == context.DeadlineExceeded {
		return &TimeoutError{Method: method}
	}
	return err
}

// ConnectError is a Dial that could not reach the server.
type ConnectError struct {
	Address string // the address dialled
	Err     error  // why it failed
}

func (e *ConnectError) Error() string {
	return fmt.Sprintf("cannot connect to %s: %v", e.Address, e.Err)
}

// Unwrap returns why the dial failed.
func (e *ConnectError) Unwrap() error { return e.Err }
