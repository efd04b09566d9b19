//go:build linux

package linux

import (
	"encoding/binary"
	"os"
	"slices"
	"sync"
	"testing"
	"time"
	"unsafe"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
	"golang.org/x/sys/unix"

	"qfw/xen"
)

// fakeEvtchn plays /dev/xen/evtchn: the test decides what each read
// returns and sees every write-back (unmask) and ioctl.
type fakeEvtchn struct {
	reads  chan fakeRead
	writes chan []uint32 // the ports of each Write
	closed chan struct{}
	once   sync.Once

	// onBind runs inside a bind ioctl, after the port exists and before
	// the ioctl returns. Set it before the first bind.
	onBind func(port uint32)

	mu       sync.Mutex
	ioctls   []uintptr
	nextPort uint32
}

type fakeRead struct {
	ports []uint32
	err   error
}

func newFakeEvtchn() *fakeEvtchn {
	return &fakeEvtchn{
		reads:  make(chan fakeRead, 16),
		writes: make(chan []uint32, 16),
		closed: make(chan struct{}),
	}
}

func (f *fakeEvtchn) Read(p []byte) (int, error) {
	select {
	case r := <-f.reads:
		if r.err != nil {
			return 0, r.err
		}
		for i, port := range r.ports {
			binary.NativeEndian.PutUint32(p[4*i:], port)
		}
		return 4 * len(r.ports), nil
	case <-f.closed:
		return 0, os.ErrClosed
	}
}

func (f *fakeEvtchn) Write(p []byte) (int, error) {
	var ports []uint32
	for i := 0; i+4 <= len(p); i += 4 {
		ports = append(ports, binary.NativeEndian.Uint32(p[i:]))
	}
	f.writes <- ports
	return len(p), nil
}

func (f *fakeEvtchn) Close() error {
	f.once.Do(func() { close(f.closed) })
	return nil
}

func (f *fakeEvtchn) ioctl(req uintptr, _ unsafe.Pointer) (int, error) {
	f.mu.Lock()
	f.ioctls = append(f.ioctls, req)
	var port uint32
	if req == ioctlEvtchnBindInterdomain || req == ioctlEvtchnBindUnboundPort {
		f.nextPort++
		port = f.nextPort
	}
	f.mu.Unlock()
	if port != 0 && f.onBind != nil {
		f.onBind(port)
	}
	return int(port), nil
}

func (f *fakeEvtchn) sawIoctl(req uintptr) bool {
	f.mu.Lock()
	defer f.mu.Unlock()
	return slices.Contains(f.ioctls, req)
}

// awaitUnmask waits for a write-back that holds every port of want.
func (f *fakeEvtchn) awaitUnmask(t *testing.T, want ...uint32) {
	t.Helper()
	timeout := time.After(5 * time.Second) // only reached when the test fails
	for {
		select {
		case got := <-f.writes:
			if !slices.ContainsFunc(want, func(p uint32) bool { return !slices.Contains(got, p) }) {
				return
			}
		case <-timeout:
			require.FailNow(t, "ports never unmasked", "%v", want)
		}
	}
}

func newTestEvents(t *testing.T, dev *fakeEvtchn) *events {
	e := newEvents(dev)
	t.Cleanup(func() { assert.NoError(t, e.close()) })
	return e
}

// An event can fire between the bind hypercall and the port's registration
// with the reader, which then unmasks it without telling anyone. The port
// must still report it.
func TestEventDuringBindIsNotLost(t *testing.T) {
	dev := newFakeEvtchn()
	dev.onBind = func(port uint32) {
		dev.reads <- fakeRead{ports: []uint32{port}} // the peer notifies at once
		dev.awaitUnmask(t, port)                     // the reader has handled it
	}
	e := newTestEvents(t, dev)
	for _, bind := range []func() (xen.EventChannel, error){
		func() (xen.EventChannel, error) { return e.BindInterdomain(1, 5) },
		func() (xen.EventChannel, error) { return e.AllocUnbound(1) },
	} {
		p, err := bind()
		require.NoError(t, err)
		select {
		case <-p.C():
		default:
			t.Fatalf("port %d: the event that fired during the bind was lost", p.Port())
		}
	}
}

// After a ring overflow (read fails with EFBIG) the kernel has dropped
// fired ports that stay masked until written back, and nobody knows which:
// the reader must reset the ring, unmask every port it has, and wake them.
func TestOverflowUnmasksEveryPort(t *testing.T) {
	dev := newFakeEvtchn()
	e := newTestEvents(t, dev)
	a, err := e.AllocUnbound(1)
	require.NoError(t, err)
	b, err := e.BindInterdomain(2, 7)
	require.NoError(t, err)
	for _, p := range []xen.EventChannel{a, b} {
		<-p.C() // the wake-up of the bind
	}

	dev.reads <- fakeRead{err: unix.EFBIG}
	dev.awaitUnmask(t, uint32(a.Port()), uint32(b.Port()))
	assert.True(t, dev.sawIoctl(ioctlEvtchnReset))
	for _, p := range []xen.EventChannel{a, b} {
		select {
		case <-p.C():
		case <-time.After(5 * time.Second): // only reached when the test fails
			t.Fatalf("port %d not woken after the overflow", p.Port())
		}
	}

	// The reader goes on: a later event is delivered and unmasked.
	dev.reads <- fakeRead{ports: []uint32{uint32(b.Port())}}
	dev.awaitUnmask(t, uint32(b.Port()))
	<-b.C()
}

func TestPortNotifyAndClose(t *testing.T) {
	dev := newFakeEvtchn()
	e := newTestEvents(t, dev)
	p, err := e.BindInterdomain(3, 9)
	require.NoError(t, err)
	require.NoError(t, p.Notify())
	assert.True(t, dev.sawIoctl(ioctlEvtchnNotify))
	require.NoError(t, p.Close())
	assert.True(t, dev.sawIoctl(ioctlEvtchnUnbind))
	assert.ErrorIs(t, p.Notify(), xen.ErrPortClosed)
	assert.ErrorIs(t, p.Close(), xen.ErrPortClosed)

	// An event for a closed port is still unmasked, and wakes nobody.
	dev.reads <- fakeRead{ports: []uint32{uint32(p.Port())}}
	dev.awaitUnmask(t, uint32(p.Port()))
}
