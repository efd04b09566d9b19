//go:build linux

// Package linux implements the xen interfaces with the Linux devices
// /dev/xen/{xenbus,evtchn,gntdev,gntalloc}: what qfw uses when it runs as a
// Xen guest. Everything it can check without Xen (ioctl numbers, argument
// layouts) is tested; every entry point fails with a clear error when the
// devices are missing.
package linux

import (
	"unsafe"

	"golang.org/x/sys/unix"
)

// ioc encodes an ioctl number as x86-64 and arm64 Linux do:
// _IOC(dir, type, nr, size) = dir<<30 | size<<16 | type<<8 | nr.
func ioc(dir, typ, nr, size uintptr) uintptr {
	return dir<<30 | size<<16 | typ<<8 | nr
}

const iocNone = 0

// Argument layouts of include/uapi/xen/{evtchn,gntdev,gntalloc}.h. Arrays
// declared [1] in C are sized for the largest batch we send; the ioctl
// numbers still encode the C size, which the kernel does not check.

type evtchnBindInterdomain struct {
	RemoteDomain uint32
	RemotePort   uint32
}

type evtchnBindUnboundPort struct{ RemoteDomain uint32 }

type evtchnPort struct{ Port uint32 } // UNBIND and NOTIFY

// maxBatch bounds the grants of one map or share call (vchan's largest
// ring is 256 pages).
const maxBatch = 256

type gntdevGrantRef struct {
	Domid uint32
	Ref   uint32
}

type gntdevMapGrantRef struct {
	Count uint32
	Pad   uint32
	Index uint64 // out: mmap offset
	Refs  [maxBatch]gntdevGrantRef
}

type gntdevUnmapGrantRef struct {
	Index uint64
	Count uint32
	Pad   uint32
}

// unmapNotify is gntdev's and gntalloc's SET_UNMAP_NOTIFY argument.
type unmapNotify struct {
	Index  uint64 // mmap offset of the byte to clear
	Action uint32
	Port   uint32
}

const (
	unmapNotifyClearByte = 0x1
	unmapNotifyEvent     = 0x2
)

// gntdevCopySegment is struct gntdev_grant_copy_segment. Each side is a
// union: a local virtual address, or {ref u32, offset u16, domid u16}.
type gntdevCopySegment struct {
	Source [8]byte
	Dest   [8]byte
	Len    uint16
	Flags  uint16
	Status int16
	_      uint16
}

const (
	gntcopySourceGref = 1
	gntcopyDestGref   = 2
)

type gntdevGrantCopy struct {
	Count    uint32
	_        uint32
	Segments uintptr // *gntdevCopySegment, pinned during the call
}

type gntallocAllocGref struct {
	Domid   uint16
	Flags   uint16
	Count   uint32
	Index   uint64 // out: mmap offset
	GrefIDs [maxBatch]uint32
}

const gntallocFlagWritable = 1

type gntallocDeallocGref struct {
	Index uint64
	Count uint32
	_     uint32
}

// C sizes of the variable-length structs (one array element).
const (
	sizeofGntdevMapGrantRef = 24
	sizeofGntallocAllocGref = 24
)

var (
	ioctlEvtchnBindInterdomain = ioc(iocNone, 'E', 1, unsafe.Sizeof(evtchnBindInterdomain{}))
	ioctlEvtchnBindUnboundPort = ioc(iocNone, 'E', 2, unsafe.Sizeof(evtchnBindUnboundPort{}))
	ioctlEvtchnUnbind          = ioc(iocNone, 'E', 3, unsafe.Sizeof(evtchnPort{}))
	ioctlEvtchnNotify          = ioc(iocNone, 'E', 4, unsafe.Sizeof(evtchnPort{}))
	ioctlEvtchnReset           = ioc(iocNone, 'E', 5, 0)

	ioctlGntdevMapGrantRef    = ioc(iocNone, 'G', 0, sizeofGntdevMapGrantRef)
	ioctlGntdevUnmapGrantRef  = ioc(iocNone, 'G', 1, unsafe.Sizeof(gntdevUnmapGrantRef{}))
	ioctlGntdevSetUnmapNotify = ioc(iocNone, 'G', 7, unsafe.Sizeof(unmapNotify{}))
	ioctlGntdevGrantCopy      = ioc(iocNone, 'G', 8, unsafe.Sizeof(gntdevGrantCopy{}))

	ioctlGntallocAllocGref      = ioc(iocNone, 'G', 5, sizeofGntallocAllocGref)
	ioctlGntallocDeallocGref    = ioc(iocNone, 'G', 6, unsafe.Sizeof(gntallocDeallocGref{}))
	ioctlGntallocSetUnmapNotify = ioc(iocNone, 'G', 7, unsafe.Sizeof(unmapNotify{}))
)

// ioctl runs one ioctl with a pointer argument and returns its result.
func ioctl(fd int, req uintptr, arg unsafe.Pointer) (int, error) {
	r, _, errno := unix.Syscall(unix.SYS_IOCTL, uintptr(fd), req, uintptr(arg))
	if errno != 0 {
		return 0, errno
	}
	return int(r), nil
}
