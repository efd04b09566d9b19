package qubesdb

import (
	"context"
	"errors"
	"fmt"
	"strings"

	"qfw/qubesdb/internal/evq"
)

// Op says what happened to a watched path.
type Op uint8

const (
	// OpWrite: the path was written (possibly with the same value).
	OpWrite Op = iota + 1
	// OpRm: the path, or the subtree if it ends with '/', was removed.
	OpRm
	// OpOverflow: the watcher fell behind and events were dropped; re-read
	// everything the watch covers. Path is empty.
	OpOverflow
)

func (o Op) String() string {
	switch o {
	case OpWrite:
		return "write"
	case OpRm:
		return "rm"
	case OpOverflow:
		return "overflow"
	}
	return fmt.Sprintf("op(%d)", uint8(o))
}

// Event is one change seen by a watch.
type Event struct {
	Op   Op
	Path string
}

// WatchQueueLen is how many events a watch holds before it reports
// OpOverflow instead.
const WatchQueueLen = 1024

// ErrClosed is returned by Next once the watch is closed.
var ErrClosed = evq.ErrClosed

// Watch receives the changes to some paths of a DB. A pattern ending with
// '/' matches every path that starts with it; any other pattern matches
// only itself (as in the QubesDB daemon). Events are queued without ever
// blocking the writer; a watcher that falls behind gets OpOverflow.
type Watch struct {
	db       *DB
	patterns []string
	q        *evq.Queue[Event]
}

// Watch registers a watch for the given patterns; an event is delivered
// once even if several patterns match it.
func (db *DB) Watch(patterns ...string) (*Watch, error) {
	if len(patterns) == 0 {
		return nil, errors.New("watch: no pattern")
	}
	for _, p := range patterns {
		if p == "" {
			return nil, fmt.Errorf("%w: empty watch pattern", ErrInvalid)
		}
		if err := CheckPath(p); err != nil {
			return nil, fmt.Errorf("watch: %w", err)
		}
	}
	w := &Watch{db: db, patterns: patterns, q: evq.New[Event](WatchQueueLen)}
	db.mu.Lock()
	db.watches[w] = struct{}{}
	db.mu.Unlock()
	return w, nil
}

func (w *Watch) matches(path string) bool {
	for _, p := range w.patterns {
		if path == p || strings.HasSuffix(p, "/") && strings.HasPrefix(path, p) {
			return true
		}
	}
	return false
}

// fire queues ev on every matching watch; db.mu is held, so events reach
// each watch in the order the changes happened.
func (db *DB) fire(ev Event) {
	for w := range db.watches {
		if w.matches(ev.Path) {
			w.q.Push(ev)
		}
	}
}

// Next waits for the next event.
func (w *Watch) Next(ctx context.Context) (Event, error) {
	ev, overflow, err := w.q.Pop(ctx)
	if overflow {
		return Event{Op: OpOverflow}, nil
	}
	return ev, err
}

// Close unregisters the watch; Next returns ErrClosed from then on.
func (w *Watch) Close() {
	w.db.mu.Lock()
	delete(w.db.watches, w)
	w.db.mu.Unlock()
	w.q.Close()
}
