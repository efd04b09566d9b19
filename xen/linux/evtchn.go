//go:build linux

package linux

import (
	"encoding/binary"
	"errors"
	"fmt"
	"os"
	"sync"
	"syscall"
	"unsafe"

	"golang.org/x/sys/unix"

	"qfw/xen"
)

const devDir = "/dev/xen/"

// openDev opens a /dev/xen device, saying what is missing if it is absent.
func openDev(name string) (*os.File, error) {
	f, err := os.OpenFile(devDir+name, os.O_RDWR, 0)
	if err != nil {
		return nil, fmt.Errorf("xen/linux: %w (not running under Xen, or the Xen driver for %s is not loaded)", err, name)
	}
	return f, nil
}

// control runs an ioctl on f without taking it out of the Go poller.
func control(rc syscall.RawConn, req uintptr, arg unsafe.Pointer) (int, error) {
	var r int
	var err error
	if cerr := rc.Control(func(fd uintptr) { r, err = ioctl(int(fd), req, arg) }); cerr != nil {
		return 0, cerr
	}
	return r, err
}

// evtchnDev is what events needs of an open /dev/xen/evtchn: read fired
// ports, write ports back to unmask them, run ioctls. Tests fake it.
type evtchnDev interface {
	Read(p []byte) (int, error)
	Write(p []byte) (int, error)
	Close() error
	ioctl(req uintptr, arg unsafe.Pointer) (int, error)
}

// evtchnFile is the real device.
type evtchnFile struct {
	*os.File
	rc syscall.RawConn
}

func (f evtchnFile) ioctl(req uintptr, arg unsafe.Pointer) (int, error) {
	return control(f.rc, req, arg)
}

// events is one /dev/xen/evtchn handle. A reader goroutine turns the port
// numbers the kernel reports into wake-ups on each port's channel and
// unmasks them again (the kernel masks a port until it is written back).
type events struct {
	dev evtchnDev

	mu    sync.Mutex
	ports map[xen.Port]*port
	done  chan struct{}
}

var _ xen.EventChannels = (*events)(nil)

func openEvents() (*events, error) {
	f, err := openDev("evtchn")
	if err != nil {
		return nil, err
	}
	rc, err := f.SyscallConn()
	if err != nil {
		f.Close()
		return nil, err
	}
	return newEvents(evtchnFile{f, rc}), nil
}

func newEvents(dev evtchnDev) *events {
	e := &events{dev: dev, ports: make(map[xen.Port]*port), done: make(chan struct{})}
	go e.readLoop()
	return e
}

func (e *events) readLoop() {
	defer close(e.done)
	buf := make([]byte, 4*256)
	for {
		n, err := e.dev.Read(buf)
		if errors.Is(err, unix.EFBIG) { // the kernel's ring overflowed
			// The ports it dropped stay masked until written back, and
			// we cannot tell which they were: reset the ring, unmask
			// every port, and let everyone re-check.
			_, err := e.dev.ioctl(ioctlEvtchnReset, nil)
			if err == nil {
				_, err = e.dev.Write(e.allPorts())
			}
			e.kickAll()
			if err != nil {
				return
			}
			continue
		}
		if err != nil {
			e.kickAll()
			return
		}
		n -= n % 4
		e.mu.Lock()
		for i := 0; i < n; i += 4 {
			if p := e.ports[xen.Port(binary.NativeEndian.Uint32(buf[i:]))]; p != nil {
				kick(p.c)
			}
		}
		e.mu.Unlock()
		if _, err := e.dev.Write(buf[:n]); err != nil { // unmask
			return
		}
	}
}

// allPorts encodes the numbers of every bound port, as write wants them.
func (e *events) allPorts() []byte {
	e.mu.Lock()
	defer e.mu.Unlock()
	b := make([]byte, 0, 4*len(e.ports))
	for n := range e.ports {
		b = binary.NativeEndian.AppendUint32(b, uint32(n))
	}
	return b
}

func (e *events) kickAll() {
	e.mu.Lock()
	defer e.mu.Unlock()
	for _, p := range e.ports {
		kick(p.c)
	}
}

func kick(c chan struct{}) {
	select {
	case c <- struct{}{}:
	default:
	}
}

func (e *events) bind(req uintptr, arg unsafe.Pointer, what string) (xen.EventChannel, error) {
	r, err := e.dev.ioctl(req, arg)
	if err != nil {
		return nil, fmt.Errorf("xen/linux: %s: %w", what, err)
	}
	p := &port{e: e, num: xen.Port(r), c: make(chan struct{}, 1)}
	e.mu.Lock()
	e.ports[p.num] = p
	e.mu.Unlock()
	// The port is live since the ioctl: an event that fired before it
	// was in the map was unmasked by the reader but reported to nobody.
	// Callers re-check shared state on every wake-up, so an extra one is
	// harmless; a lost one could leave them asleep.
	kick(p.c)
	return p, nil
}

func (e *events) AllocUnbound(remote xen.DomID) (xen.EventChannel, error) {
	arg := evtchnBindUnboundPort{RemoteDomain: uint32(remote)}
	return e.bind(ioctlEvtchnBindUnboundPort, unsafe.Pointer(&arg), fmt.Sprintf("alloc unbound port for dom%d", remote))
}

func (e *events) BindInterdomain(remote xen.DomID, rport xen.Port) (xen.EventChannel, error) {
	arg := evtchnBindInterdomain{RemoteDomain: uint32(remote), RemotePort: uint32(rport)}
	return e.bind(ioctlEvtchnBindInterdomain, unsafe.Pointer(&arg), fmt.Sprintf("bind to dom%d port %d", remote, rport))
}

func (e *events) close() error {
	err := e.dev.Close()
	<-e.done
	return err
}

type port struct {
	e   *events
	num xen.Port
	c   chan struct{}
}

func (p *port) Port() xen.Port     { return p.num }
func (p *port) C() <-chan struct{} { return p.c }

func (p *port) live() bool {
	p.e.mu.Lock()
	defer p.e.mu.Unlock()
	return p.e.ports[p.num] == p
}

// Notify sends an event. Xen drops events on an unbound port silently, so
// ErrPortUnbound never comes from here.
func (p *port) Notify() error {
	if !p.live() {
		return fmt.Errorf("xen/linux: notify port %d: %w", p.num, xen.ErrPortClosed)
	}
	arg := evtchnPort{Port: uint32(p.num)}
	if _, err := p.e.dev.ioctl(ioctlEvtchnNotify, unsafe.Pointer(&arg)); err != nil {
		return fmt.Errorf("xen/linux: notify port %d: %w", p.num, err)
	}
	return nil
}

func (p *port) Close() error {
	p.e.mu.Lock()
	if p.e.ports[p.num] != p {
		p.e.mu.Unlock()
		return fmt.Errorf("xen/linux: close port %d: %w", p.num, xen.ErrPortClosed)
	}
	delete(p.e.ports, p.num)
	p.e.mu.Unlock()
	arg := evtchnPort{Port: uint32(p.num)}
	if _, err := p.e.dev.ioctl(ioctlEvtchnUnbind, unsafe.Pointer(&arg)); err != nil {
		return fmt.Errorf("xen/linux: unbind port %d: %w", p.num, err)
	}
	return nil
}
