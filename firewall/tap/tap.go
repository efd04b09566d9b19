// Package tap implements firewall.Link over a Linux TAP device, so that the
// userspace engine can be wired to real Linux network stacks (network
// namespaces) for tests, benchmarks and `qfw -platform tap`.
//
// The engine is the "wire end" of the TAP: frames the kernel sends out of the
// TAP interface are what Read returns, and frames given to Write arrive at the
// kernel as if received by that interface. The TAP interface may be moved to
// another network namespace after Open; the file descriptor keeps working.
package tap

import (
	"bytes"
	"encoding/binary"
	"errors"
	"fmt"
	"net"
	"os"
	"sync/atomic"
	"syscall"

	"golang.org/x/sys/unix"
)

// BatchSize is how many frames one Read may return. A Read blocks only until
// the first frame is there, then takes what is already queued, up to this.
const BatchSize = 64

// tunPath is the Linux TUN/TAP clone device.
const tunPath = "/dev/net/tun"

// Device is one TAP interface opened by this process.
type Device struct {
	name      string
	file      *os.File
	conn      syscall.RawConn
	mtu       int
	mac       net.HardwareAddr // the engine's own address on this link
	kernelMAC net.HardwareAddr // the kernel interface's address at Open
	// current is the kernel interface's address now, learned from the
	// source of the frames it sends (48 bits in a uint64).
	current atomic.Uint64
	closed  atomic.Bool
}

// Open attaches to the TAP interface called name in the current network
// namespace, creating it if there is none (a created interface disappears when
// the Device is closed). mac is the address the engine uses on this link; the
// kernel interface keeps its own (KernelMAC).
func Open(name string, mac net.HardwareAddr) (*Device, error) {
	if err := validName(name); err != nil {
		return nil, err
	}
	if len(mac) != 6 {
		return nil, fmt.Errorf("tap %s: engine MAC %q is not a 6-byte Ethernet address", name, mac)
	}
	fd, err := unix.Open(tunPath, unix.O_RDWR|unix.O_NONBLOCK|unix.O_CLOEXEC, 0)
	if err != nil {
		return nil, fmt.Errorf("tap %s: open %s: %w%s", name, tunPath, err, hint(err))
	}
	ifr, err := unix.NewIfreq(name)
	if err != nil {
		unix.Close(fd)
		return nil, fmt.Errorf("tap %s: %w", name, err)
	}
	ifr.SetUint16(unix.IFF_TAP | unix.IFF_NO_PI)
	if err := unix.IoctlIfreq(fd, unix.TUNSETIFF, ifr); err != nil {
		unix.Close(fd)
		return nil, fmt.Errorf("tap %s: attach (TUNSETIFF): %w%s", name, err, hint(err))
	}
	// A non-blocking descriptor is registered with the Go poller, so a Read
	// parked in the poller returns when Close is called.
	file := os.NewFile(uintptr(fd), tunPath)
	conn, err := file.SyscallConn()
	if err != nil {
		file.Close()
		return nil, fmt.Errorf("tap %s: %w", name, err)
	}
	iface, err := net.InterfaceByName(name)
	if err != nil {
		file.Close()
		return nil, fmt.Errorf("tap %s: read interface: %w", name, err)
	}
	d := &Device{
		name:      name,
		file:      file,
		conn:      conn,
		mtu:       iface.MTU,
		mac:       append(net.HardwareAddr(nil), mac...),
		kernelMAC: iface.HardwareAddr,
	}
	d.current.Store(macBits(iface.HardwareAddr))
	return d, nil
}

// macBits packs a 6-byte address into an integer.
func macBits(mac []byte) uint64 {
	var b [8]byte
	copy(b[2:], mac[:6])
	return binary.BigEndian.Uint64(b[:])
}

// validName applies the kernel's rules for interface names, so that a bad
// name fails with a message instead of an opaque EINVAL.
func validName(name string) error {
	if name == "" || name == "." || name == ".." || len(name) >= unix.IFNAMSIZ {
		return fmt.Errorf("tap %q: interface name must have 1 to %d characters and not be . or ..", name, unix.IFNAMSIZ-1)
	}
	for _, c := range []byte(name) {
		if c == '/' || c == ':' || c <= ' ' || c >= 0x7f {
			return fmt.Errorf("tap %q: interface name must be printable ASCII without '/', ':' or spaces", name)
		}
	}
	return nil
}

// hint explains the errors of opening and attaching a TAP that have a usual
// cause.
func hint(err error) string {
	switch {
	case errors.Is(err, unix.EPERM), errors.Is(err, unix.EACCES):
		return " (creating or attaching a TAP needs CAP_NET_ADMIN, or a persistent TAP owned by this user)"
	case errors.Is(err, unix.EINVAL):
		return " (an interface of that name exists but is not a TAP without packet information)"
	case errors.Is(err, unix.EBUSY):
		return " (another process is attached to that TAP)"
	}
	return ""
}

// Name is the TAP interface's name.
func (d *Device) Name() string { return d.name }

// MTU is the TAP interface's MTU when it was opened.
func (d *Device) MTU() int { return d.mtu }

// MAC is the engine's own address on this link.
func (d *Device) MAC() net.HardwareAddr { return d.mac }

// KernelMAC is the address the kernel's TAP interface had at Open, i.e. of
// the Linux stack at the other end of this link. If the interface is given
// another address later (as Qubes gives every client 00:16:3e:5e:6c:00),
// Write delivers frames addressed to this one to the new address, learned
// from the frames the kernel sends: the engine keeps working.
func (d *Device) KernelMAC() net.HardwareAddr { return d.kernelMAC }

// BatchSize is the most frames one Read returns.
func (d *Device) BatchSize() int { return BatchSize }

// Read waits for at least one frame, then fills bufs with the frames already
// queued (at most min(len(bufs), len(sizes))). Frames larger than their buffer
// are dropped, never returned cut. After Close it returns net.ErrClosed.
func (d *Device) Read(bufs [][]byte, sizes []int) (int, error) {
	limit := min(len(bufs), len(sizes))
	if limit == 0 {
		return 0, nil
	}
	n := 0
	var readErr error
	err := d.conn.Read(func(fd uintptr) bool {
		for n < limit {
			buf := bufs[n]
			if len(buf) == 0 {
				readErr = fmt.Errorf("tap %s: read buffer %d is empty", d.name, n)
				return true
			}
			m, err := unix.Read(int(fd), buf)
			switch {
			case err == unix.EINTR:
				continue
			case err == unix.EAGAIN:
				return n > 0 // park in the poller only while nothing was read
			case err != nil:
				readErr = fmt.Errorf("tap %s: read: %w", d.name, err)
				return true
			case m > len(buf):
				continue // the kernel cut the frame: drop it
			}
			d.learn(buf[:m])
			sizes[n] = m
			n++
		}
		return true
	})
	if n > 0 {
		return n, nil // a pending error shows on the next call
	}
	if err != nil {
		return 0, d.pollError(err)
	}
	return 0, readErr
}

// learn notes the kernel interface's address from the source of a frame it
// sent.
func (d *Device) learn(frame []byte) {
	if len(frame) < ethHeaderLen || frame[6]&1 != 0 { // a multicast source is bogus
		return
	}
	if bits := macBits(frame[6:12]); bits != d.current.Load() {
		d.current.Store(bits)
	}
}

// ethHeaderLen is the size of an Ethernet header.
const ethHeaderLen = 14

// write sends one frame. A frame for the interface's address at Open goes to
// its current address when that changed: the header is rewritten in a copy,
// the caller's buffer is left alone.
func (d *Device) write(fd int, frame []byte) error {
	cur := d.current.Load()
	if len(frame) < ethHeaderLen || !bytes.Equal(frame[:6], d.kernelMAC) || cur == macBits(d.kernelMAC) {
		_, err := unix.Write(fd, frame)
		return err
	}
	var dst [8]byte
	binary.BigEndian.PutUint64(dst[:], cur)
	_, err := unix.Writev(fd, [][]byte{dst[2:], frame[6:]})
	return err
}

// Write sends each frame to the kernel as if received on the TAP interface.
// A frame the kernel refuses (interface down, malformed frame) is dropped as
// a real wire would; only a closed or broken descriptor is an error.
func (d *Device) Write(bufs [][]byte) (int, error) {
	n := 0
	var writeErr error
	err := d.conn.Write(func(fd uintptr) bool {
		for n < len(bufs) {
			err := d.write(int(fd), bufs[n])
			switch err {
			case nil:
			case unix.EINTR:
				continue
			case unix.EAGAIN:
				return false
			case unix.EBADF, unix.EBADFD:
				writeErr = fmt.Errorf("tap %s: write: %w", d.name, err)
				return true
			}
			n++
		}
		return true
	})
	if err != nil {
		return n, d.pollError(err)
	}
	return n, writeErr
}

// pollError turns the poller's error into the one firewall.Link promises
// after Close: net.ErrClosed.
func (d *Device) pollError(err error) error {
	if d.closed.Load() {
		return net.ErrClosed
	}
	return fmt.Errorf("tap %s: %w", d.name, err)
}

// Close detaches from the TAP interface and unblocks a pending Read.
func (d *Device) Close() error {
	d.closed.Store(true)
	return d.file.Close()
}
