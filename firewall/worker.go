package firewall

import (
	"gvisor.dev/gvisor/pkg/tcpip/header"
)

// scratchFrameSize fits every frame the engine makes itself: the largest is
// an ICMPv6 error quoting up to the IPv6 minimum MTU.
const scratchFrameSize = header.EthernetMinimumSize + header.IPv6MinimumMTU

// worker is the state of one link's goroutine. Nothing in it is shared.
type worker struct {
	engine *Engine
	in     *port
	bufs   [][]byte // read batch, reused; forwarded frames are rewritten in place
	sizes  []int
	now    int64 // unix nanoseconds, once per batch
	pkt    packet

	scratch     [][]byte // frames made by the engine (replies, ICMP errors)
	scratchUsed int
	out         []outBatch // frames to write, per destination link
	outUsed     int
}

// outBatch collects the frames of one batch that go out of one link.
type outBatch struct {
	to     *port
	frames [][]byte
}

func newWorker(e *Engine, p *port) *worker {
	n := max(1, p.link.BatchSize())
	w := &worker{
		engine:  e,
		in:      p,
		bufs:    make([][]byte, n),
		sizes:   make([]int, n),
		scratch: make([][]byte, n),
	}
	for i := range w.bufs {
		w.bufs[i] = make([]byte, header.EthernetMinimumSize+p.mtu)
		w.scratch[i] = make([]byte, scratchFrameSize)
	}
	return w
}

// processBatch handles n frames read into w.bufs, then writes the results.
func (w *worker) processBatch(n int) {
	e := w.engine
	e.mu.Lock()
	w.now = e.now().UnixNano()
	c := w.in.client
	for i := range n {
		frame := w.bufs[i][:w.sizes[i]]
		switch {
		case c == nil:
			w.fromUplink(frame)
		case !c.removed:
			w.fromClient(c, frame)
		}
	}
	e.mu.Unlock()
	w.flush()
}

// send queues frame for link to; it is written at the end of the batch.
func (w *worker) send(to *port, frame []byte) {
	for i := range w.outUsed {
		if w.out[i].to == to {
			w.out[i].frames = append(w.out[i].frames, frame)
			return
		}
	}
	if w.outUsed == len(w.out) {
		w.out = append(w.out, outBatch{frames: make([][]byte, 0, len(w.bufs))})
	}
	b := &w.out[w.outUsed]
	w.outUsed++
	b.to = to
	b.frames = append(b.frames, frame)
}

// scratchFrame returns a buffer for a frame the engine makes, or nil when
// this batch has used them all (then the reply is not sent).
func (w *worker) scratchFrame() []byte {
	if w.scratchUsed == len(w.scratch) {
		return nil
	}
	b := w.scratch[w.scratchUsed]
	w.scratchUsed++
	return b
}

// flush writes every queued frame, one Write per destination link. A
// client link that fails to write is removed; an uplink write failure drops
// the frames and is logged.
func (w *worker) flush() {
	e := w.engine
	for i := range w.outUsed {
		b := &w.out[i]
		b.to.writeMu.Lock()
		_, err := b.to.link.Write(b.frames)
		b.to.writeMu.Unlock()
		if err != nil {
			if c := b.to.client; c != nil {
				e.log.Warn("writing to client failed, removing it", "client", c.name, "err", err)
				e.removeClient(c)
			} else {
				e.uplinkWriteFailed(len(b.frames), err)
			}
		}
		clear(b.frames) // drop references to the buffers
		b.frames, b.to = b.frames[:0], nil
	}
	w.outUsed, w.scratchUsed = 0, 0
}
