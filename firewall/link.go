package firewall

import (
	"io"
	"net"
	"sync"
)

// Link is one Ethernet port of the firewall: the uplink to sys-net or the
// vif of one client. Its shape follows wireguard-go's tun.Device: frames move
// in batches so that a port can use batched I/O underneath.
//
// Read and Write may be called concurrently with each other, but the engine
// never calls Read, or Write, from two goroutines at once on the same Link.
type Link interface {
	// Read blocks until at least one frame has arrived, then fills bufs[i]
	// with up to len(bufs) whole Ethernet frames (destination MAC first, no
	// FCS) and sets sizes[i] to each frame's length. A frame longer than its
	// buffer is dropped by the link. After Close, Read returns net.ErrClosed
	// (or io.EOF) and no frames.
	Read(bufs [][]byte, sizes []int) (n int, err error)
	// Write sends every frame of bufs (each a whole Ethernet frame) and
	// returns how many were sent. The buffers may be reused once Write returns.
	Write(bufs [][]byte) (int, error)
	// BatchSize is the largest number of frames that one Read or Write
	// handles; the engine sizes its buffers with it.
	BatchSize() int
	// MTU is the largest IP packet (Ethernet payload) the link carries.
	MTU() int
	// MAC is this side's Ethernet address: fe:ff:ff:ff:ff:ff on client vifs,
	// the firewall VM's own address on the uplink.
	MAC() net.HardwareAddr
	// Close unblocks Read and releases the link. Further calls return
	// net.ErrClosed.
	Close() error
}

// Defaults for in-memory links.
const (
	DefaultMTU       = 1500
	DefaultBatchSize = 64
	memLinkQueue     = 1024 // frames in flight per direction of a pipe
)

// MemLink is an in-memory Link: one end of a pipe made by Pipe. Frames
// written to one end are read from the other. It copies every frame, so it is
// meant for tests and simulation, not for speed. When the reader falls
// more than memLinkQueue frames behind, further frames are dropped, as on
// a real link.
type MemLink struct {
	mac  net.HardwareAddr
	mtu  int
	rx   chan []byte // frames for this end
	tx   chan []byte // the peer's rx
	done chan struct{}
	once sync.Once
	peer *MemLink
}

// Pipe returns two connected in-memory links: a has Ethernet address macA,
// b has macB, both carry IP packets up to mtu bytes.
func Pipe(macA, macB net.HardwareAddr, mtu int) (a, b *MemLink) {
	ab := make(chan []byte, memLinkQueue)
	ba := make(chan []byte, memLinkQueue)
	a = &MemLink{mac: macA, mtu: mtu, rx: ba, tx: ab, done: make(chan struct{})}
	b = &MemLink{mac: macB, mtu: mtu, rx: ab, tx: ba, done: make(chan struct{})}
	a.peer, b.peer = b, a
	return a, b
}

// Read implements Link.
func (l *MemLink) Read(bufs [][]byte, sizes []int) (int, error) {
	if len(bufs) == 0 {
		return 0, nil
	}
	n := 0
	for n == 0 { // block until a frame that fits has arrived
		var frame []byte
		select {
		case <-l.done:
			return 0, net.ErrClosed
		case <-l.peer.done:
			return 0, io.EOF // the other end was closed: the cable is unplugged
		case frame = <-l.rx:
		}
		for {
			if len(frame) <= len(bufs[n]) {
				sizes[n] = copy(bufs[n], frame)
				n++
			}
			if n == len(bufs) {
				return n, nil
			}
			select {
			case frame = <-l.rx:
				continue
			default:
			}
			break
		}
	}
	return n, nil
}

// Write implements Link. Writing to a pipe whose other end is closed
// silently drops the frames, as a cable to a switched-off machine would.
func (l *MemLink) Write(bufs [][]byte) (int, error) {
	select {
	case <-l.done:
		return 0, net.ErrClosed
	default:
	}
	for _, b := range bufs {
		frame := append([]byte(nil), b...)
		select {
		case l.tx <- frame:
		default: // the reader is too slow: drop
		}
	}
	return len(bufs), nil
}

// BatchSize implements Link.
func (l *MemLink) BatchSize() int { return DefaultBatchSize }

// MTU implements Link.
func (l *MemLink) MTU() int { return l.mtu }

// MAC implements Link.
func (l *MemLink) MAC() net.HardwareAddr { return l.mac }

// Close implements Link.
func (l *MemLink) Close() error {
	l.once.Do(func() { close(l.done) })
	return nil
}
