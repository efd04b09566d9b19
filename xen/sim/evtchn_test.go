package sim_test

import (
	"testing"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"qfw/xen"
)

func TestEventChannelBothWays(t *testing.T) {
	h := newHV(t)
	vm := newDomain(t, h, "vm")
	a, err := h.Dom0().AllocUnbound(vm.ID())
	require.NoError(t, err)
	assert.NotZero(t, a.Port())
	require.ErrorIs(t, a.Notify(), xen.ErrPortUnbound, "nobody bound yet")

	b, err := vm.BindInterdomain(xen.Dom0, a.Port())
	require.NoError(t, err)
	require.NoError(t, a.Notify())
	require.NoError(t, a.Notify())
	waitEvent(t, b.C())
	noEvent(t, b.C()) // events coalesce into one pending bit
	noEvent(t, a.C())

	require.NoError(t, b.Notify())
	waitEvent(t, a.C())

	require.NoError(t, b.Close())
	require.ErrorIs(t, b.Notify(), xen.ErrPortClosed)
	require.ErrorIs(t, b.Close(), xen.ErrPortClosed)
	require.ErrorIs(t, a.Notify(), xen.ErrPortUnbound, "peer closed")

	// Xen lets the peer bind the now unbound port again.
	b2, err := vm.BindInterdomain(xen.Dom0, a.Port())
	require.NoError(t, err)
	require.NoError(t, b2.Notify())
	waitEvent(t, a.C())
}

func TestBindRejects(t *testing.T) {
	h := newHV(t)
	vm := newDomain(t, h, "vm")
	other := newDomain(t, h, "other")
	a, err := h.Dom0().AllocUnbound(vm.ID())
	require.NoError(t, err)

	_, err = other.BindInterdomain(xen.Dom0, a.Port())
	require.Error(t, err, "port allocated for another domain")
	_, err = vm.BindInterdomain(xen.Dom0, a.Port()+100)
	require.Error(t, err, "no such port")
	_, err = vm.BindInterdomain(55, 1)
	require.Error(t, err, "no such domain")
	_, err = h.Dom0().AllocUnbound(55)
	require.Error(t, err, "unbound port for a missing domain")

	_, err = vm.BindInterdomain(xen.Dom0, a.Port())
	require.NoError(t, err)
	_, err = vm.BindInterdomain(xen.Dom0, a.Port())
	require.Error(t, err, "already bound")
}
