// Package evq is a bounded event queue whose producer never blocks: when the
// consumer falls behind, queued events are dropped and the consumer is told
// that it lost some, so that it can rescan instead of trusting a partial
// history.
package evq

import (
	"context"
	"errors"
	"sync"
)

// ErrClosed is returned by Pop once the queue is closed.
var ErrClosed = errors.New("event queue closed")

// Queue holds at most a fixed number of events.
type Queue[T any] struct {
	max   int
	ready chan struct{} // holds a token while Pop has something to report
	done  chan struct{} // closed by Close

	mu       sync.Mutex
	ring     []T // allocated on first Push
	head, n  int
	overflow bool
	closed   bool
}

// New returns a queue that holds at most limit events (at least one).
func New[T any](limit int) *Queue[T] {
	return &Queue[T]{
		max:   max(limit, 1),
		ready: make(chan struct{}, 1),
		done:  make(chan struct{}),
	}
}

// Push appends v. If the queue is full, everything queued is dropped and the
// next Pop reports the overflow before any later event.
func (q *Queue[T]) Push(v T) {
	q.mu.Lock()
	if q.closed {
		q.mu.Unlock()
		return
	}
	if q.ring == nil {
		q.ring = make([]T, q.max)
	}
	if q.n == q.max {
		clear(q.ring)
		q.head, q.n = 0, 0
		q.overflow = true
	}
	q.ring[(q.head+q.n)%q.max] = v
	q.n++
	q.mu.Unlock()
	q.signal()
}

func (q *Queue[T]) signal() {
	select {
	case q.ready <- struct{}{}:
	default:
	}
}

// Pop returns the oldest event. overflow is true, with a zero v, when
// events were dropped since the previous Pop.
func (q *Queue[T]) Pop(ctx context.Context) (v T, overflow bool, err error) {
	for {
		q.mu.Lock()
		switch {
		case q.closed:
			q.mu.Unlock()
			return v, false, ErrClosed
		case q.overflow:
			q.overflow = false
			q.mu.Unlock()
			q.signal()
			return v, true, nil
		case q.n > 0:
			var zero T
			v, q.ring[q.head] = q.ring[q.head], zero
			q.head = (q.head + 1) % q.max
			q.n--
			more := q.n > 0
			q.mu.Unlock()
			if more {
				q.signal()
			}
			return v, false, nil
		}
		q.mu.Unlock()
		select {
		case <-q.ready:
		case <-q.done:
		case <-ctx.Done():
			return v, false, ctx.Err()
		}
	}
}

// Close drops what is queued; Pop returns ErrClosed from then on.
func (q *Queue[T]) Close() {
	q.mu.Lock()
	defer q.mu.Unlock()
	if !q.closed {
		q.closed = true
		q.ring, q.n = nil, 0
		close(q.done)
	}
}
