//go:build linux

package linux

import (
	"context"
	"encoding/binary"
	"io/fs"
	"os"
	"testing"
	"time"
	"unsafe"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"qfw/xen"
)

// Numbers from the spec tables (xen-netif.md 5.1, qubes.md 2.9), which were
// printed by a C program compiled against the kernel headers.
func TestIoctlNumbers(t *testing.T) {
	for _, tc := range []struct {
		name      string
		got, want uintptr
	}{
		{"EVTCHN_BIND_INTERDOMAIN", ioctlEvtchnBindInterdomain, 0x00084501},
		{"EVTCHN_BIND_UNBOUND_PORT", ioctlEvtchnBindUnboundPort, 0x00044502},
		{"EVTCHN_UNBIND", ioctlEvtchnUnbind, 0x00044503},
		{"EVTCHN_NOTIFY", ioctlEvtchnNotify, 0x00044504},
		{"EVTCHN_RESET", ioctlEvtchnReset, 0x00004505},
		{"GNTDEV_MAP_GRANT_REF", ioctlGntdevMapGrantRef, 0x00184700},
		{"GNTDEV_UNMAP_GRANT_REF", ioctlGntdevUnmapGrantRef, 0x00104701},
		{"GNTDEV_SET_UNMAP_NOTIFY", ioctlGntdevSetUnmapNotify, 0x00104707},
		{"GNTDEV_GRANT_COPY", ioctlGntdevGrantCopy, 0x00104708},
		{"GNTALLOC_ALLOC_GREF", ioctlGntallocAllocGref, 0x00184705},
		{"GNTALLOC_DEALLOC_GREF", ioctlGntallocDeallocGref, 0x00104706},
		{"GNTALLOC_SET_UNMAP_NOTIFY", ioctlGntallocSetUnmapNotify, 0x00104707},
	} {
		assert.Equal(t, tc.want, tc.got, "%s = %#08x", tc.name, tc.got)
	}
}

func TestStructLayouts(t *testing.T) {
	type field struct {
		name      string
		got, want uintptr
	}
	var (
		bi  evtchnBindInterdomain
		mg  gntdevMapGrantRef
		um  gntdevUnmapGrantRef
		un  unmapNotify
		seg gntdevCopySegment
		gc  gntdevGrantCopy
		ag  gntallocAllocGref
		dg  gntallocDeallocGref
	)
	for _, f := range []field{
		{"evtchn_bind_interdomain size", unsafe.Sizeof(bi), 8},
		{"evtchn_bind_interdomain.remote_port", unsafe.Offsetof(bi.RemotePort), 4},
		{"evtchn_bind_unbound_port size", unsafe.Sizeof(evtchnBindUnboundPort{}), 4},
		{"evtchn port size", unsafe.Sizeof(evtchnPort{}), 4},
		{"gntdev_grant_ref size", unsafe.Sizeof(gntdevGrantRef{}), 8},
		{"gntdev_map_grant_ref.index", unsafe.Offsetof(mg.Index), 8},
		{"gntdev_map_grant_ref.refs", unsafe.Offsetof(mg.Refs), 16},
		{"gntdev_map_grant_ref C size", unsafe.Offsetof(mg.Refs) + unsafe.Sizeof(mg.Refs[0]), sizeofGntdevMapGrantRef},
		{"gntdev_unmap_grant_ref size", unsafe.Sizeof(um), 16},
		{"gntdev_unmap_grant_ref.count", unsafe.Offsetof(um.Count), 8},
		{"unmap_notify size", unsafe.Sizeof(un), 16},
		{"unmap_notify.action", unsafe.Offsetof(un.Action), 8},
		{"unmap_notify.event_channel_port", unsafe.Offsetof(un.Port), 12},
		{"grant_copy_segment size", unsafe.Sizeof(seg), 24},
		{"grant_copy_segment.dest", unsafe.Offsetof(seg.Dest), 8},
		{"grant_copy_segment.len", unsafe.Offsetof(seg.Len), 16},
		{"grant_copy_segment.flags", unsafe.Offsetof(seg.Flags), 18},
		{"grant_copy_segment.status", unsafe.Offsetof(seg.Status), 20},
		{"grant_copy size", unsafe.Sizeof(gc), 16},
		{"grant_copy.segments", unsafe.Offsetof(gc.Segments), 8},
		{"gntalloc_alloc_gref.flags", unsafe.Offsetof(ag.Flags), 2},
		{"gntalloc_alloc_gref.count", unsafe.Offsetof(ag.Count), 4},
		{"gntalloc_alloc_gref.index", unsafe.Offsetof(ag.Index), 8},
		{"gntalloc_alloc_gref.gref_ids", unsafe.Offsetof(ag.GrefIDs), 16},
		{"gntalloc_alloc_gref C size", (unsafe.Offsetof(ag.GrefIDs) + unsafe.Sizeof(ag.GrefIDs[0]) + 7) &^ 7, sizeofGntallocAllocGref}, // padded to u64 alignment
		{"gntalloc_dealloc_gref size", unsafe.Sizeof(dg), 16},
		{"gntalloc_dealloc_gref.count", unsafe.Offsetof(dg.Count), 8},
	} {
		assert.Equal(t, f.want, f.got, f.name)
	}
	assert.Equal(t, uint32(1), uint32(unmapNotifyClearByte))
	assert.Equal(t, uint32(2), uint32(unmapNotifyEvent))
}

// copyBuf lives on the heap, so its address is stable (a stack may move).
var copyBuf = make([]byte, 100)

func TestCopySegmentEncoding(t *testing.T) {
	buf := copyBuf
	op := xen.CopyOp{Dom: 0x0102, Ref: 0x0a0b0c0d, Offset: 0x0304, Buf: buf, ToGrant: true}
	s, st := segment(&op)
	require.Equal(t, xen.GrantOkay, st)
	assert.Equal(t, [8]byte{0x0d, 0x0c, 0x0b, 0x0a, 0x04, 0x03, 0x02, 0x01}, s.Dest, "{ref u32, offset u16, domid u16}")
	assert.Equal(t, uint64(uintptr(unsafe.Pointer(&buf[0]))), binary.NativeEndian.Uint64(s.Source[:]))
	assert.Equal(t, uint16(gntcopyDestGref), s.Flags)
	assert.Equal(t, uint16(100), s.Len)

	op.ToGrant = false
	s, _ = segment(&op)
	assert.Equal(t, uint16(gntcopySourceGref), s.Flags)
	assert.Equal(t, foreign(op.Ref, op.Offset, op.Dom), s.Source)

	for _, bad := range []xen.CopyOp{
		{Offset: 4000, Buf: buf},
		{Offset: -1, Buf: buf},
		{Buf: make([]byte, xen.PageSize+1)},
	} {
		_, st := segment(&bad)
		assert.Equal(t, xen.GrantBadCopyArg, st, "the kernel would fail the whole batch")
	}
}

func TestOpenWithoutXen(t *testing.T) {
	if _, err := os.Stat("/dev/xen/xenbus"); err == nil {
		t.Skip("running under Xen: /dev/xen/xenbus exists")
	}
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	_, err := Open(ctx)
	require.ErrorIs(t, err, fs.ErrNotExist)
	assert.Contains(t, err.Error(), "/dev/xen/xenbus")
	assert.Contains(t, err.Error(), "not running under Xen")
	_, err = openEvents()
	require.ErrorIs(t, err, fs.ErrNotExist)
	_, err = openGrants()
	require.ErrorIs(t, err, fs.ErrNotExist)
}
