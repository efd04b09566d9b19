package sim_test

import (
	"context"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"qfw/xen"
	"qfw/xen/sim"
)

// testTimeout bounds every wait so that a bug fails a test instead of hanging it.
const testTimeout = 10 * time.Second

func newHV(t *testing.T) *sim.Hypervisor {
	t.Helper()
	h := sim.New()
	t.Cleanup(h.Close)
	return h
}

func newDomain(t *testing.T, h *sim.Hypervisor, name string) *sim.Domain {
	t.Helper()
	d, err := h.CreateDomain(name)
	require.NoError(t, err)
	return d
}

func ctxT(t *testing.T) context.Context {
	ctx, cancel := context.WithTimeout(context.Background(), testTimeout)
	t.Cleanup(cancel)
	return ctx
}

// waitEvent fails the test unless ch delivers within the test timeout.
func waitEvent(t *testing.T, ch <-chan struct{}) {
	t.Helper()
	select {
	case <-ch:
	case <-time.After(testTimeout):
		t.Fatal("no event")
	}
}

func noEvent(t *testing.T, ch <-chan struct{}) {
	t.Helper()
	select {
	case <-ch:
		t.Fatal("unexpected event")
	default:
	}
}

func TestShareMapBothWays(t *testing.T) {
	h := newHV(t)
	vm := newDomain(t, h, "vm")
	s, err := h.Dom0().Share(vm.ID(), 2, true)
	require.NoError(t, err)
	require.Len(t, s.Refs(), 2)
	require.Len(t, s.Pages(), 2)
	assert.NotEqual(t, s.Refs()[0], s.Refs()[1])
	for _, p := range s.Pages() {
		assert.Len(t, p, xen.PageSize)
	}

	m, err := vm.Map(xen.Dom0, s.Refs(), true)
	require.NoError(t, err)
	m.Pages()[1][7] = 0xaa
	assert.Equal(t, byte(0xaa), s.Pages()[1][7])
	s.Pages()[0][4095] = 0x55
	assert.Equal(t, byte(0x55), m.Pages()[0][4095])

	require.NoError(t, m.Close())
	require.NoError(t, s.Close())
}

func TestMapRejectsIllegalUse(t *testing.T) {
	h := newHV(t)
	vm := newDomain(t, h, "vm")
	other := newDomain(t, h, "other")
	rw, err := h.Dom0().Share(vm.ID(), 1, true)
	require.NoError(t, err)
	ro, err := h.Dom0().Share(vm.ID(), 1, false)
	require.NoError(t, err)
	closed, err := h.Dom0().Share(vm.ID(), 1, true)
	require.NoError(t, err)
	require.NoError(t, closed.Close())

	for _, tc := range []struct {
		name     string
		d        *sim.Domain
		peer     xen.DomID
		refs     []xen.GrantRef
		writable bool
		want     error
	}{
		{"not granted to the mapper", other, xen.Dom0, rw.Refs(), false, xen.GrantPermissionDenied},
		{"read-only grant mapped writable", vm, xen.Dom0, ro.Refs(), true, xen.GrantPermissionDenied},
		{"unknown reference", vm, xen.Dom0, []xen.GrantRef{9999}, false, xen.GrantBadRef},
		{"reserved reference", vm, xen.Dom0, []xen.GrantRef{0}, false, xen.GrantBadRef},
		{"revoked grant", vm, xen.Dom0, closed.Refs(), false, xen.GrantBadRef},
		{"wrong granter", vm, other.ID(), rw.Refs(), false, xen.GrantBadRef},
		{"no such domain", vm, 77, rw.Refs(), false, xen.GrantBadDomain},
		{"one bad ref in a batch", vm, xen.Dom0, []xen.GrantRef{rw.Refs()[0], 9999}, false, xen.GrantBadRef},
	} {
		t.Run(tc.name, func(t *testing.T) {
			m, err := tc.d.Map(tc.peer, tc.refs, tc.writable)
			require.ErrorIs(t, err, tc.want)
			assert.Nil(t, m)
		})
	}

	_, err = vm.Map(xen.Dom0, nil, false)
	require.Error(t, err, "empty batch")

	// The failed batch mapped nothing: the grant is still free to end now.
	m, err := vm.Map(xen.Dom0, ro.Refs(), false)
	require.NoError(t, err, "read-only grants map read-only")
	require.NoError(t, m.Close())
	require.ErrorIs(t, m.Close(), sim.ErrClosed, "double unmap")
	require.NoError(t, ro.Close())
	require.ErrorIs(t, ro.Close(), sim.ErrClosed, "double revoke")
}

func TestRevokeWhileMappedIsDeferred(t *testing.T) {
	h := newHV(t)
	vm := newDomain(t, h, "vm")
	s, err := h.Dom0().Share(vm.ID(), 1, true)
	require.NoError(t, err)
	ref := s.Refs()[0]
	m, err := vm.Map(xen.Dom0, s.Refs(), true)
	require.NoError(t, err)
	s.Pages()[0][0] = 42

	require.NoError(t, s.Close())
	// Xen refuses to end a mapped grant: the mapper keeps the page...
	assert.Equal(t, byte(42), m.Pages()[0][0])
	// ...but nobody can map it again, and its reference is not reused.
	_, err = vm.Map(xen.Dom0, []xen.GrantRef{ref}, false)
	require.ErrorIs(t, err, xen.GrantBadRef)
	s2, err := h.Dom0().Share(vm.ID(), 1, true)
	require.NoError(t, err)
	assert.NotEqual(t, ref, s2.Refs()[0])

	require.NoError(t, m.Close())
	s3, err := h.Dom0().Share(vm.ID(), 1, true)
	require.NoError(t, err)
	assert.Equal(t, ref, s3.Refs()[0], "reference freed once unmapped")
}

func TestGrantCopy(t *testing.T) {
	h := newHV(t)
	vm := newDomain(t, h, "vm")
	other := newDomain(t, h, "other")
	rw, err := vm.Share(xen.Dom0, 1, true)
	require.NoError(t, err)
	ro, err := vm.Share(xen.Dom0, 1, false)
	require.NoError(t, err)
	copy(ro.Pages()[0][100:], "read only data")

	in := make([]byte, 14)
	ops := []xen.CopyOp{
		{Dom: vm.ID(), Ref: rw.Refs()[0], Offset: 4090, Buf: []byte("abcdef"), ToGrant: true},
		{Dom: vm.ID(), Ref: ro.Refs()[0], Offset: 100, Buf: in},
		{Dom: vm.ID(), Ref: ro.Refs()[0], Offset: 0, Buf: []byte("x"), ToGrant: true},
		{Dom: vm.ID(), Ref: rw.Refs()[0], Offset: 4091, Buf: []byte("abcdef"), ToGrant: true},
		{Dom: vm.ID(), Ref: rw.Refs()[0], Offset: -1, Buf: []byte("a")},
		{Dom: vm.ID(), Ref: rw.Refs()[0], Buf: make([]byte, xen.PageSize+1)},
		{Dom: vm.ID(), Ref: 4242, Buf: []byte("a")},
		{Dom: 99, Ref: rw.Refs()[0], Buf: []byte("a")},
	}
	require.NoError(t, h.Dom0().Copy(ops))
	want := []xen.GrantStatus{
		xen.GrantOkay, xen.GrantOkay, xen.GrantPermissionDenied, xen.GrantBadCopyArg,
		xen.GrantBadCopyArg, xen.GrantBadCopyArg, xen.GrantBadRef, xen.GrantBadDomain,
	}
	for i, w := range want {
		assert.Equal(t, w, ops[i].Status, "op %d", i)
	}
	assert.Equal(t, "abcdef", string(rw.Pages()[0][4090:]))
	assert.Equal(t, "read only data", string(in))
	assert.Equal(t, byte(0), ro.Pages()[0][0], "read-only page unchanged")
	assert.NoError(t, ops[0].Status.Err())
	assert.ErrorIs(t, ops[2].Status.Err(), xen.GrantPermissionDenied)

	// A domain the page was not granted to may not copy it.
	op := []xen.CopyOp{{Dom: vm.ID(), Ref: rw.Refs()[0], Buf: make([]byte, 1)}}
	require.NoError(t, other.Copy(op))
	assert.Equal(t, xen.GrantPermissionDenied, op[0].Status)
}

func TestNotifyOnCloseClearsByteAndKicks(t *testing.T) {
	h := newHV(t)
	vm := newDomain(t, h, "vm")
	s, err := h.Dom0().Share(vm.ID(), 2, true)
	require.NoError(t, err)
	m, err := vm.Map(xen.Dom0, s.Refs(), true)
	require.NoError(t, err)
	srvPort, err := h.Dom0().AllocUnbound(vm.ID())
	require.NoError(t, err)
	cliPort, err := vm.BindInterdomain(xen.Dom0, srvPort.Port())
	require.NoError(t, err)

	require.Error(t, m.NotifyOnClose(2*xen.PageSize, cliPort.Port()), "offset outside the pages")
	require.ErrorIs(t, m.NotifyOnClose(0, 999), xen.ErrPortClosed, "port not bound by this domain")
	require.NoError(t, m.NotifyOnClose(xen.PageSize+21, cliPort.Port()))
	s.Pages()[1][20] = 7
	s.Pages()[1][21] = 1
	s.Pages()[1][22] = 9
	require.NoError(t, m.Close())
	waitEvent(t, srvPort.C())
	assert.Equal(t, []byte{7, 0, 9}, s.Pages()[1][20:23], "only the chosen byte is cleared")
}

func TestDestroyReleasesEverything(t *testing.T) {
	h := newHV(t)
	vm := newDomain(t, h, "vm")
	dom0 := h.Dom0()

	// vm grants a page that dom0 maps, with vm's close notification on it.
	s, err := vm.Share(xen.Dom0, 1, true)
	require.NoError(t, err)
	m, err := dom0.Map(vm.ID(), s.Refs(), true)
	require.NoError(t, err)
	p0, err := dom0.AllocUnbound(vm.ID())
	require.NoError(t, err)
	pv, err := vm.BindInterdomain(xen.Dom0, p0.Port())
	require.NoError(t, err)
	require.NoError(t, s.NotifyOnClose(21, pv.Port()))
	s.Pages()[0][21] = 1

	// dom0 grants a page that vm maps.
	s0, err := dom0.Share(vm.ID(), 1, true)
	require.NoError(t, err)
	_, err = vm.Map(xen.Dom0, s0.Refs(), true)
	require.NoError(t, err)

	require.NoError(t, vm.Destroy())
	require.ErrorIs(t, vm.Destroy(), sim.ErrDead)
	waitEvent(t, p0.C())
	assert.Equal(t, byte(0), m.Pages()[0][21], "close notification ran")
	require.ErrorIs(t, p0.Notify(), xen.ErrPortUnbound)
	_, ok := h.Domain(vm.ID())
	assert.False(t, ok)

	_, err = dom0.Map(vm.ID(), s.Refs(), false)
	require.ErrorIs(t, err, xen.GrantBadDomain)
	require.NoError(t, s0.Close(), "vm's mapping was released, so the grant ends")
	require.NoError(t, m.Close(), "a dead domain's page stays mapped until unmapped")
	_, err = vm.Share(xen.Dom0, 1, true)
	require.ErrorIs(t, err, sim.ErrDead)
	_, err = vm.AllocUnbound(xen.Dom0)
	require.ErrorIs(t, err, sim.ErrDead)
	require.Error(t, dom0.Destroy())
}

func TestLimits(t *testing.T) {
	lim := sim.DefaultLimits()
	lim.Grants, lim.Mappings, lim.Ports, lim.Domains = 3, 2, 2, 2
	h := sim.NewWithLimits(lim)
	t.Cleanup(h.Close)
	vm := newDomain(t, h, "vm")
	_, err := h.CreateDomain("too many")
	require.ErrorIs(t, err, xen.ErrNoMemory)

	s, err := h.Dom0().Share(vm.ID(), 3, true)
	require.NoError(t, err)
	_, err = h.Dom0().Share(vm.ID(), 1, true)
	require.ErrorIs(t, err, xen.ErrNoMemory)
	_, err = h.Dom0().Share(vm.ID(), 4, true)
	require.Error(t, err)
	_, err = vm.Map(xen.Dom0, s.Refs(), true)
	require.Error(t, err, "three pages exceed the mapping limit")
	m, err := vm.Map(xen.Dom0, s.Refs()[:2], true)
	require.NoError(t, err)
	_, err = vm.Map(xen.Dom0, s.Refs()[2:], true)
	require.ErrorIs(t, err, xen.ErrNoMemory)
	require.NoError(t, m.Close())

	_, err = vm.AllocUnbound(xen.Dom0)
	require.NoError(t, err)
	_, err = vm.AllocUnbound(xen.Dom0)
	require.NoError(t, err)
	_, err = vm.AllocUnbound(xen.Dom0)
	require.ErrorIs(t, err, xen.ErrNoMemory)
}
