package xenstore

import (
	"context"
	"strconv"
	"sync"
)

// maxQueuedEvents bounds the events a watch holds for a slow reader. Past it
// the queue collapses into one event for the watched path itself: xenstore
// events only say "look again", so a reader loses nothing by re-reading.
const maxQueuedEvents = 1024

// Watch delivers the paths that changed at or below a watched path. Like
// xenstored, the server fires it once when it is set, and may fire spuriously.
type Watch struct {
	c     *Client
	path  string
	token string

	mu      sync.Mutex
	queue   []string
	stopped bool
	kick    chan struct{} // cap 1: queue became non-empty or the watch stopped
	out     chan string
	done    chan struct{} // closed when the forwarder has exited
}

// Watch sets a watch on path. A relative path yields relative event paths.
func (c *Client) Watch(ctx context.Context, path string) (*Watch, error) {
	w := &Watch{
		c:    c,
		path: path,
		kick: make(chan struct{}, 1),
		out:  make(chan string),
		done: make(chan struct{}),
	}
	c.mu.Lock()
	if c.err != nil {
		err := c.err
		c.mu.Unlock()
		return nil, &Error{OpWatch, path, err}
	}
	c.nextToken++
	w.token = "qfw" + strconv.FormatUint(c.nextToken, 10)
	// Register before asking: the first event may beat the reply.
	c.watches[w.token] = w
	c.mu.Unlock()
	go w.forward()

	if _, err := c.request(ctx, OpWatch, 0, path, AppendStrings(nil, path, w.token)); err != nil {
		c.dropWatch(w)
		return nil, err
	}
	return w, nil
}

// C delivers changed paths. It is closed when the watch is closed or the
// connection ends.
func (w *Watch) C() <-chan string { return w.out }

// Path returns the watched path as given to Watch.
func (w *Watch) Path() string { return w.path }

// Close removes the watch and closes C.
func (w *Watch) Close(ctx context.Context) error {
	if !w.c.dropWatch(w) {
		return nil
	}
	_, err := w.c.request(ctx, OpUnwatch, 0, w.path, AppendStrings(nil, w.path, w.token))
	return err
}

// dropWatch unregisters w and stops its forwarder; it reports whether w was
// still registered.
func (c *Client) dropWatch(w *Watch) bool {
	c.mu.Lock()
	registered := c.watches[w.token] == w
	if registered {
		delete(c.watches, w.token)
	}
	c.mu.Unlock()
	w.stop()
	return registered
}

func (w *Watch) deliver(path string) {
	w.mu.Lock()
	if len(w.queue) >= maxQueuedEvents {
		w.queue = append(w.queue[:0], w.path)
	} else {
		w.queue = append(w.queue, path)
	}
	w.mu.Unlock()
	w.signal()
}

func (w *Watch) stop() {
	w.mu.Lock()
	w.stopped = true
	w.mu.Unlock()
	w.signal()
	<-w.done
}

func (w *Watch) signal() {
	select {
	case w.kick <- struct{}{}:
	default:
	}
}

// forward moves queued events to the unbuffered channel, so the client's
// reader never blocks on a slow watch consumer.
func (w *Watch) forward() {
	defer close(w.done)
	defer close(w.out)
	for {
		w.mu.Lock()
		if w.stopped {
			w.mu.Unlock()
			return
		}
		var next string
		have := len(w.queue) > 0
		if have {
			next = w.queue[0]
			w.queue = w.queue[1:]
		}
		w.mu.Unlock()
		if !have {
			<-w.kick
			continue
		}
		select {
		case w.out <- next:
		case <-w.kick:
			w.requeue(next)
		}
	}
}

// requeue puts back an event whose send was interrupted by a kick.
func (w *Watch) requeue(path string) {
	w.mu.Lock()
	w.queue = append([]string{path}, w.queue...)
	w.mu.Unlock()
}
