//go:build linux

package linux

import (
	"encoding/binary"
	"errors"
	"fmt"
	"os"
	"runtime"
	"sync"
	"syscall"
	"unsafe"

	"golang.org/x/sys/unix"

	"qfw/xen"
)

// grants maps foreign pages with /dev/xen/gntdev and shares our own with
// /dev/xen/gntalloc.
type grants struct {
	dev, alloc     *os.File
	devRC, allocRC syscall.RawConn
	devFd, allocFd int // for mmap, which needs the descriptor itself
	copyMu         sync.Mutex
	segs           []gntdevCopySegment // reused by Copy
	idx            []int               // ops index of each segment
}

var _ xen.GrantTable = (*grants)(nil)

func openGrants() (*grants, error) {
	dev, err := openDev("gntdev")
	if err != nil {
		return nil, err
	}
	alloc, err := openDev("gntalloc")
	if err != nil {
		dev.Close()
		return nil, err
	}
	g := &grants{dev: dev, alloc: alloc}
	for _, x := range []struct {
		f  *os.File
		rc *syscall.RawConn
		fd *int
	}{{dev, &g.devRC, &g.devFd}, {alloc, &g.allocRC, &g.allocFd}} {
		rc, err := x.f.SyscallConn()
		if err == nil {
			err = rc.Control(func(fd uintptr) { *x.fd = int(fd) })
		}
		if err != nil {
			g.close()
			return nil, err
		}
		*x.rc = rc
	}
	return g, nil
}

func (g *grants) close() error {
	return errors.Join(g.dev.Close(), g.alloc.Close())
}

func checkCount(n int) error {
	if n <= 0 || n > maxBatch {
		return fmt.Errorf("xen/linux: %d pages: want 1..%d", n, maxBatch)
	}
	return nil
}

func splitPages(mem []byte) [][]byte {
	pages := make([][]byte, len(mem)/xen.PageSize)
	for i := range pages {
		pages[i] = mem[i*xen.PageSize : (i+1)*xen.PageSize : (i+1)*xen.PageSize]
	}
	return pages
}

// mapped is memory mmapped from gntdev or gntalloc.
type mapped struct {
	rc      syscall.RawConn
	mem     []byte
	pages   [][]byte
	index   uint64 // mmap offset
	notify  uintptr
	release func() error // gntdev unmap or gntalloc dealloc
	once    sync.Once
}

func (m *mapped) Pages() [][]byte { return m.pages }

func (m *mapped) NotifyOnClose(off int, port xen.Port) error {
	if off < 0 || off >= len(m.mem) {
		return fmt.Errorf("xen/linux: notify on close: offset %d outside %d bytes", off, len(m.mem))
	}
	arg := unmapNotify{Index: m.index + uint64(off), Action: unmapNotifyClearByte | unmapNotifyEvent, Port: uint32(port)}
	if _, err := control(m.rc, m.notify, unsafe.Pointer(&arg)); err != nil {
		return fmt.Errorf("xen/linux: set unmap notify: %w", err)
	}
	return nil
}

func (m *mapped) Close() error {
	err := errors.New("xen/linux: already closed")
	m.once.Do(func() {
		err = errors.Join(unix.Munmap(m.mem), m.release())
	})
	return err
}

type share struct {
	mapped
	refs []xen.GrantRef
}

func (s *share) Refs() []xen.GrantRef { return s.refs }

// Share allocates and grants pages with gntalloc. The kernel ends the grants
// once both our mapping and the peer's are gone.
func (g *grants) Share(peer xen.DomID, count int, writable bool) (xen.Share, error) {
	if err := checkCount(count); err != nil {
		return nil, err
	}
	a := gntallocAllocGref{Domid: uint16(peer), Count: uint32(count)}
	if writable {
		a.Flags = gntallocFlagWritable
	}
	if _, err := control(g.allocRC, ioctlGntallocAllocGref, unsafe.Pointer(&a)); err != nil {
		return nil, fmt.Errorf("xen/linux: grant %d pages to dom%d: %w", count, peer, err)
	}
	dealloc := func() error {
		d := gntallocDeallocGref{Index: a.Index, Count: uint32(count)}
		_, err := control(g.allocRC, ioctlGntallocDeallocGref, unsafe.Pointer(&d))
		return err
	}
	mem, err := unix.Mmap(g.allocFd, int64(a.Index), count*xen.PageSize, unix.PROT_READ|unix.PROT_WRITE, unix.MAP_SHARED)
	if err != nil {
		return nil, errors.Join(fmt.Errorf("xen/linux: mmap granted pages: %w", err), dealloc())
	}
	s := &share{
		mapped: mapped{rc: g.allocRC, mem: mem, pages: splitPages(mem), index: a.Index, notify: ioctlGntallocSetUnmapNotify, release: dealloc},
		refs:   make([]xen.GrantRef, count),
	}
	for i := range s.refs {
		s.refs[i] = xen.GrantRef(a.GrefIDs[i])
	}
	return s, nil
}

// Map maps peer's grants with gntdev, read-only unless writable.
func (g *grants) Map(peer xen.DomID, refs []xen.GrantRef, writable bool) (xen.Mapping, error) {
	if err := checkCount(len(refs)); err != nil {
		return nil, err
	}
	m := gntdevMapGrantRef{Count: uint32(len(refs))}
	for i, r := range refs {
		m.Refs[i] = gntdevGrantRef{Domid: uint32(peer), Ref: uint32(r)}
	}
	if _, err := control(g.devRC, ioctlGntdevMapGrantRef, unsafe.Pointer(&m)); err != nil {
		return nil, fmt.Errorf("xen/linux: map grants %v of dom%d: %w", refs, peer, err)
	}
	unmap := func() error {
		u := gntdevUnmapGrantRef{Index: m.Index, Count: uint32(len(refs))}
		_, err := control(g.devRC, ioctlGntdevUnmapGrantRef, unsafe.Pointer(&u))
		return err
	}
	prot := unix.PROT_READ
	if writable {
		prot |= unix.PROT_WRITE
	}
	// The hypercall happens here: a grant we may not map fails the mmap.
	mem, err := unix.Mmap(g.devFd, int64(m.Index), len(refs)*xen.PageSize, prot, unix.MAP_SHARED)
	if err != nil {
		return nil, errors.Join(fmt.Errorf("xen/linux: map grants %v of dom%d: %w", refs, peer, err), unmap())
	}
	return &mapped{rc: g.devRC, mem: mem, pages: splitPages(mem), index: m.Index, notify: ioctlGntdevSetUnmapNotify, release: unmap}, nil
}

// foreign encodes the grant side of a copy segment: {ref u32, offset u16,
// domid u16}.
func foreign(ref xen.GrantRef, off int, dom xen.DomID) (b [8]byte) {
	binary.NativeEndian.PutUint32(b[0:], uint32(ref))
	binary.NativeEndian.PutUint16(b[4:], uint16(off))
	binary.NativeEndian.PutUint16(b[6:], uint16(dom))
	return b
}

// segment builds the copy segment of op, or says why the kernel would
// refuse it (it fails a whole batch with EINVAL for one bad segment).
func segment(op *xen.CopyOp) (gntdevCopySegment, xen.GrantStatus) {
	if op.Offset < 0 || len(op.Buf) > xen.PageSize || op.Offset+len(op.Buf) > xen.PageSize {
		return gntdevCopySegment{}, xen.GrantBadCopyArg
	}
	var local [8]byte
	binary.NativeEndian.PutUint64(local[:], uint64(uintptr(unsafe.Pointer(unsafe.SliceData(op.Buf)))))
	s := gntdevCopySegment{Len: uint16(len(op.Buf))}
	if op.ToGrant {
		s.Source, s.Dest, s.Flags = local, foreign(op.Ref, op.Offset, op.Dom), gntcopyDestGref
	} else {
		s.Source, s.Dest, s.Flags = foreign(op.Ref, op.Offset, op.Dom), local, gntcopySourceGref
	}
	return s, xen.GrantOkay
}

// Copy runs the valid ops in one GRANT_COPY ioctl; the rest get their
// status without reaching the kernel.
func (g *grants) Copy(ops []xen.CopyOp) error {
	g.copyMu.Lock()
	defer g.copyMu.Unlock()
	var pin runtime.Pinner // the kernel reads Go memory through embedded pointers
	defer pin.Unpin()
	g.segs = g.segs[:0]
	g.idx = g.idx[:0]
	for i := range ops {
		op := &ops[i]
		if len(op.Buf) > 0 {
			pin.Pin(unsafe.SliceData(op.Buf))
		}
		s, st := segment(op)
		op.Status = st
		if st != xen.GrantOkay || len(op.Buf) == 0 {
			continue
		}
		g.segs = append(g.segs, s)
		g.idx = append(g.idx, i)
	}
	if len(g.segs) == 0 {
		return nil
	}
	pin.Pin(&g.segs[0])
	c := gntdevGrantCopy{Count: uint32(len(g.segs)), Segments: uintptr(unsafe.Pointer(&g.segs[0]))}
	if _, err := control(g.devRC, ioctlGntdevGrantCopy, unsafe.Pointer(&c)); err != nil {
		return fmt.Errorf("xen/linux: grant copy of %d segments: %w", len(g.segs), err)
	}
	for j, i := range g.idx {
		ops[i].Status = xen.GrantStatus(g.segs[j].Status)
	}
	return nil
}
