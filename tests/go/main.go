// The generated Go client against real and stand-in servers; prints what it saw as JSON.
// Usage: timer-go-test MODE ADDRESS (modes: e2e, events, vectors, frames, older,
// notice, no-notice, connect).
package main

import (
	"bufio"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"math"
	"os"
	"sync"
	"time"

	"example.com/timer"
)

var seen = map[string]any{}

func main() {
	mode, address := os.Args[1], os.Args[2]
	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	defer cancel()
	switch mode {
	case "e2e":
		e2e(ctx, address)
	case "events":
		events(ctx, address)
	case "vectors", "frames", "older":
		var opts []timer.Option
		if mode == "older" { // a server without the close notice refuses the ask
			opts = append(opts, timer.WithCloseNotice())
		}
		client := dial(ctx, address, opts...)
		hello := timer.EchoRequest{Message: "hello over the wire", DelayMs: 5}
		seen["version"] = must(client.Version(ctx))
		seen["echo"] = must(client.Echo(ctx, hello))
		switch mode {
		case "frames":
			frames(ctx, client)
		case "older": // the stand-in closes instead of answering
			_, err := client.Echo(ctx, hello)
			seen["unanswered"] = describe(err)
		}
	case "notice":
		notice(ctx, address, timer.WithCloseNotice())
	case "no-notice":
		notice(ctx, address)
	case "connect":
		_, err := timer.Dial(ctx, address)
		var connect *timer.ConnectError
		seen["connect"] = errors.As(err, &connect) && connect.Address == address
	}
	out, err := json.Marshal(seen)
	if err != nil {
		panic(err)
	}
	fmt.Println(string(out))
}

func dial(ctx context.Context, address string, opts ...timer.Option) *timer.Client {
	client, err := timer.Dial(ctx, address, opts...)
	if err != nil {
		panic(err)
	}
	return client
}

func must[T any](v T, err error) T {
	if err != nil {
		panic(err)
	}
	return v
}

// describe names an error by its type and fields, for the test to compare.
func describe(err error) string {
	var remote *timer.RemoteError
	var timeout *timer.TimeoutError
	var invalid *timer.InvalidReplyError
	var closed *timer.ClosedError
	switch {
	case err == nil:
		return "no error"
	case errors.As(err, &remote):
		return fmt.Sprintf("RemoteError %s: %s", remote.Method, remote.Message)
	case errors.As(err, &timeout):
		return fmt.Sprintf("TimeoutError %s, deadline %v", timeout.Method, errors.Is(err, context.DeadlineExceeded))
	case errors.As(err, &invalid):
		return fmt.Sprintf("InvalidReplyError %s: %s", invalid.Method, invalid.Reason)
	case errors.As(err, &closed) && errors.Is(err, timer.ErrNotStarted):
		return "ClosedError, not started, " + closed.Reason
	case errors.As(err, &closed):
		return "ClosedError " + closed.Reason
	}
	return "other: " + err.Error()
}

func item(it timer.Item, err error) any {
	if err != nil {
		return describe(err)
	}
	switch it := it.(type) {
	case timer.OnEchoFired:
		return map[string]any{"event": it.Message, "count": it.EchoCount}
	case timer.Dropped:
		return map[string]any{"dropped": it.Count}
	case timer.Gap:
		return map[string]any{"gap": it.Reason}
	case timer.UnknownEvent:
		return map[string]any{"unknown": it.Name, "data": it.Data}
	}
	return fmt.Sprintf("%T", it)
}

func e2e(ctx context.Context, address string) {
	client := dial(ctx, address)
	seen["version"] = must(client.Version(ctx))
	seen["echo"] = must(client.Echo(ctx, timer.EchoRequest{Message: "hello over the wire", DelayMs: 5}))
	note, retries := "n", int64(3)
	two := []timer.EchoRequest{{Message: "a"}, {Message: "b"}}
	seen["complex"] = must(client.Complex(ctx, timer.ComplexRequest{Messages: two, Tags: []string{"x", "y"}, Note: &note, Retries: &retries}))
	seen["complexBare"] = must(client.Complex(ctx, timer.ComplexRequest{Messages: []timer.EchoRequest{}, Tags: []string{}}))
	job := timer.JobSpec{Name: "j", Payload: []string{"p"}, Priority: 1}
	retry := timer.RetryPolicy{MaxAttempts: 3, BackoffMs: 100, RetryOn: []string{"timeout"}}
	jitter := int64(7)
	when := timer.ScheduleConfig{StartAtMs: 1000, IntervalMs: 500, Jitter: &jitter}
	seen["schedule"] = must(client.Schedule(ctx, job, retry, when))

	bad := job
	bad.Name = ""
	_, err := client.Schedule(ctx, bad, retry, when)
	seen["error"] = describe(err)

	// The wire's whole int64 range, both ways, at both ends.
	var ends []int64
	for _, edge := range []int64{math.MaxInt64, math.MinInt64} {
		r := retry
		r.BackoffMs = edge
		w := timer.ScheduleConfig{StartAtMs: edge, IntervalMs: 0}
		got := must(client.Schedule(ctx, job, r, w))
		ends = append(ends, got.FirstRunAtMs, got.EffectiveBackoffMs)
	}
	seen["ends"] = []string{fmt.Sprint(ends[0]), fmt.Sprint(ends[1]), fmt.Sprint(ends[2]), fmt.Sprint(ends[3])}

	// 1,000 calls from 16 goroutines on the one connection: each gets its own reply.
	var wg sync.WaitGroup
	var mu sync.Mutex
	mismatched, answered := 0, 0
	for g := 0; g < 16; g++ {
		wg.Add(1)
		go func(g int) {
			defer wg.Done()
			for i := g; i < 1000; i += 16 {
				message := fmt.Sprintf("call %d", i)
				reply, err := client.Echo(ctx, timer.EchoRequest{Message: message})
				mu.Lock()
				answered++
				if err != nil || reply.Echoed != message {
					mismatched++
				}
				mu.Unlock()
			}
		}(g)
	}
	wg.Wait()
	seen["concurrent"] = []int{answered, mismatched}

	// The slow reply cannot come before 300 ms, so the 20 ms deadline always passes
	// first; the next call must get its own reply, not the slow one's.
	short, cancel := context.WithTimeout(ctx, 20*time.Millisecond)
	_, err = client.Echo(short, timer.EchoRequest{Message: "slow", DelayMs: 300})
	cancel()
	seen["timeout"] = describe(err)
	seen["afterTimeout"] = must(client.Echo(ctx, timer.EchoRequest{Message: "next"})).Echoed
	gone, cancel := context.WithCancel(ctx)
	cancel()
	_, err = client.Version(gone)
	seen["cancelled"] = errors.Is(err, context.Canceled)

	// Graceful: a call already sent still gets its reply; then calls fail as closed.
	late := later(ctx, client, timer.EchoRequest{Message: "late", DelayMs: 50})
	// Until the late call is on the wire. On a busy machine its reply may come before
	// this loop looks again: then Shutdown finds nothing pending, and the results are
	// the same (waiting for InFlight() == 1 alone would wait forever).
	for client.InFlight() != 1 && len(late) == 0 {
		time.Sleep(time.Millisecond)
	}
	seen["shutdown"] = describe(client.Shutdown(ctx))
	seen["lateReply"] = <-late
	_, err = client.Version(ctx)
	seen["afterClose"] = describe(err)
}

// stepper says where the program is and waits for the test's line on stdin.
func stepper() func(say string) {
	in := bufio.NewScanner(os.Stdin)
	return func(say string) {
		fmt.Println(say)
		if !in.Scan() {
			panic("the test went away")
		}
	}
}

// later runs an echo in the background; its reply's Echoed, or its error described.
func later(ctx context.Context, client *timer.Client, req timer.EchoRequest) <-chan string {
	out := make(chan string, 1)
	go func() {
		reply, err := client.Echo(ctx, req)
		if err != nil {
			out <- describe(err)
		} else {
			out <- reply.Echoed
		}
	}()
	return out
}

// events: the test's server fires what this reads; each step waits for a line on stdin.
func events(ctx context.Context, address string) {
	step := stepper()
	client := dial(ctx, address)
	all := must(client.Subscribe(ctx))
	named := must(client.Subscribe(ctx, timer.EventOnEchoFired))
	step("subscribed") // the test: an echo, a drop notice, a gap notice, an echo
	var items, namedItems []any
	for i := 0; i < 4; i++ {
		items = append(items, item(all.Next(ctx)))
		namedItems = append(namedItems, item(named.Next(ctx)))
	}
	seen["events"], seen["named"] = items, namedItems
	seen["closeNamed"] = describe(named.Close(ctx))

	small := dial(ctx, address, timer.WithEventQueue(2))
	held := must(small.Subscribe(ctx))
	step("small")            // the test: five echoes
	must(small.Version(ctx)) // its events were written before this reply
	var smallItems []any
	for i := 0; i < 3; i++ {
		smallItems = append(smallItems, item(held.Next(ctx)))
	}
	seen["small"] = smallItems
	seen["closeAll"] = describe(all.Close(ctx))
	_, err := all.Next(ctx)
	seen["afterClose"] = errors.Is(err, timer.ErrSubscriptionClosed)
	seen["afterUnsubscribe"] = must(client.Version(ctx))

	step("closing") // the test: the server closes
	_, err = held.Next(ctx)
	seen["ended"] = describe(err)
}

// frames: a stand-in server sends what a newer server might, around two calls.
func frames(ctx context.Context, client *timer.Client) {
	sub := must(client.Subscribe(ctx))
	var items []any
	for i := 0; i < 4; i++ {
		items = append(items, item(sub.Next(ctx)))
	}
	seen["items"] = items
	// Replies it must refuse, each with its reason, until the stand-in answers "done":
	// after each, the connection is still in step.
	var refused []string
	for i := 0; i < 20; i++ {
		reply, err := client.Echo(ctx, timer.EchoRequest{Message: fmt.Sprint(i)})
		if err == nil && reply.Echoed == "done" {
			break
		}
		refused = append(refused, describe(err))
	}
	seen["refused"] = refused
}

// notice: the test's server closes gracefully while the first echo runs and the
// second is sent but never read (its echoes wait until the program says "unread").
func notice(ctx context.Context, address string, opts ...timer.Option) {
	step := stepper()
	client := dial(ctx, address, opts...)
	seen["before"] = must(client.Version(ctx))
	sub := must(client.Subscribe(ctx))
	first := later(ctx, client, timer.EchoRequest{Message: "first"})
	step("running") // the test: the first echo runs; the server stops reading
	second := later(ctx, client, timer.EchoRequest{Message: "second"})
	for client.InFlight() != 2 {
		time.Sleep(time.Millisecond) // until the second is on the wire
	}
	step("unread") // the test: the first echo may end
	seen["first"], seen["second"] = <-first, <-second
	_, err := client.Version(ctx)
	seen["after"] = describe(err)
	seen["message"] = err.Error()
	var items []any
	for err = nil; err == nil; {
		var it timer.Item
		it, err = sub.Next(ctx)
		items = append(items, item(it, err))
	}
	seen["events"] = items
}
