package xenstore_test

import (
	"context"
	"errors"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"qfw/xen"
	"qfw/xen/sim"
	"qfw/xen/xenstore"
)

// The client is tested against the simulator's xenstored.

func setup(t *testing.T) (context.Context, *sim.Hypervisor, *sim.Domain) {
	t.Helper()
	h := sim.New()
	t.Cleanup(h.Close)
	vm, err := h.CreateDomain("vm")
	require.NoError(t, err)
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	t.Cleanup(cancel)
	return ctx, h, vm
}

func nextEvent(t *testing.T, w *xenstore.Watch) string {
	t.Helper()
	select {
	case p, ok := <-w.C():
		require.True(t, ok, "watch closed")
		return p
	case <-time.After(10 * time.Second):
		t.Fatal("no watch event")
		return ""
	}
}

func TestClientBasics(t *testing.T) {
	ctx, h, vm := setup(t)
	xs := vm.Store()

	v, err := xs.Read(ctx, "domid")
	require.NoError(t, err)
	assert.Equal(t, "1", string(v))
	v, err = xs.Read(ctx, "/local/domain/1/name")
	require.NoError(t, err)
	assert.Equal(t, "vm", string(v))

	require.NoError(t, xs.Write(ctx, "data/a/b/c", []byte("hello")))
	v, err = xs.Read(ctx, "data/a/b/c")
	require.NoError(t, err)
	assert.Equal(t, "hello", string(v))
	v, err = xs.Read(ctx, "data/a/b")
	require.NoError(t, err)
	assert.Empty(t, v, "parents are created empty")

	require.NoError(t, xs.Write(ctx, "data/a/x", nil))
	require.NoError(t, xs.Mkdir(ctx, "data/a/m"))
	require.NoError(t, xs.Mkdir(ctx, "data/a/m"), "mkdir of an existing node")
	names, err := xs.Directory(ctx, "data/a")
	require.NoError(t, err)
	assert.Equal(t, []string{"b", "m", "x"}, names)

	require.NoError(t, xs.Rm(ctx, "data/a/b"))
	require.NoError(t, xs.Rm(ctx, "data/a/b"), "rm of a missing node whose parent exists")
	err = xs.Rm(ctx, "data/nope/b")
	require.ErrorIs(t, err, xenstore.ENOENT)
	_, err = xs.Read(ctx, "data/a/b/c")
	require.ErrorIs(t, err, xenstore.ENOENT)

	p, err := xs.GetDomainPath(ctx, 7)
	require.NoError(t, err)
	assert.Equal(t, "/local/domain/7", p)
	ok, err := h.Dom0().Store().IsDomainIntroduced(ctx, vm.ID())
	require.NoError(t, err)
	assert.True(t, ok)
	_, err = xs.IsDomainIntroduced(ctx, vm.ID())
	require.ErrorIs(t, err, xenstore.EACCES, "privileged, as in xenstored")
	ok, err = h.Dom0().Store().IsDomainIntroduced(ctx, 42)
	require.NoError(t, err)
	assert.False(t, ok)

	for _, bad := range []string{"", "data//x", "data/x/", "data/x y", "data/ä"} {
		err := xs.Write(ctx, bad, nil)
		require.ErrorIs(t, err, xenstore.EINVAL, "%q", bad)
	}
	var xe *xenstore.Error
	require.True(t, errors.As(xs.Rm(ctx, "/"), &xe))
	assert.Equal(t, xenstore.OpRm, xe.Op)
}

func TestClientPermissions(t *testing.T) {
	ctx, h, vm := setup(t)
	other, err := h.CreateDomain("other")
	require.NoError(t, err)
	dom0 := h.Dom0().Store()
	xs := vm.Store()

	// A domain can read its home but not write it, and cannot see others'.
	err = xs.Write(ctx, "domid", []byte("0"))
	require.ErrorIs(t, err, xenstore.EACCES)
	_, err = xs.Read(ctx, "/local/domain/2/domid")
	require.ErrorIs(t, err, xenstore.EACCES)
	err = xs.Write(ctx, "/local/domain/0/x", nil)
	require.ErrorIs(t, err, xenstore.EACCES)

	// Nodes a domain creates are its own.
	require.NoError(t, xs.Write(ctx, "data/mine", []byte("v")))
	perms, err := xs.GetPerms(ctx, "data/mine")
	require.NoError(t, err)
	assert.Equal(t, []xenstore.Perm{{Dom: 1, Access: xenstore.AccessNone}}, perms)

	// The owner grants read to dom2, as vchan does.
	require.NoError(t, xs.SetPerms(ctx, "data/mine",
		xenstore.Perm{Dom: 1, Access: xenstore.AccessNone}, xenstore.Perm{Dom: 2, Access: xenstore.AccessRead}))
	v, err := other.Store().Read(ctx, "/local/domain/1/data/mine")
	require.NoError(t, err, "only the node's own permissions count, not its parents'")
	assert.Equal(t, "v", string(v))
	v, err = dom0.Read(ctx, "/local/domain/1/data/mine")
	require.NoError(t, err)
	assert.Equal(t, "v", string(v))
	err = other.Store().Write(ctx, "/local/domain/1/data/mine", nil)
	require.ErrorIs(t, err, xenstore.EACCES)

	// Only dom0 may give a node away.
	err = xs.SetPerms(ctx, "data/mine", xenstore.Perm{Dom: 2, Access: xenstore.AccessNone})
	require.ErrorIs(t, err, xenstore.EPERM)
	require.NoError(t, dom0.SetPerms(ctx, "/local/domain/1/data/mine", xenstore.Perm{Dom: 2, Access: xenstore.AccessRead}))
	require.NoError(t, other.Store().Write(ctx, "/local/domain/1/data/mine", []byte("w")), "new owner")
	v, err = xs.Read(ctx, "data/mine")
	require.NoError(t, err, "default access r")
	assert.Equal(t, "w", string(v))

	err = xs.SetPerms(ctx, "data/missing", xenstore.Perm{Dom: 1, Access: xenstore.AccessNone})
	require.ErrorIs(t, err, xenstore.ENOENT)
}

func TestClientQuota(t *testing.T) {
	lim := sim.DefaultLimits()
	lim.StoreNodes = 14 // the vm owns its 4 home directories, leaving 10
	h := sim.NewWithLimits(lim)
	t.Cleanup(h.Close)
	vm, err := h.CreateDomain("vm")
	require.NoError(t, err)
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	xs := vm.Store()
	require.NoError(t, xs.Write(ctx, "data/a/b/c/d/e/f/g/h/i", nil))
	err = xs.Write(ctx, "data/a/b/c/d/e/f/g/h/i/j/k", nil)
	require.ErrorIs(t, err, xenstore.ENOSPC)
	require.NoError(t, xs.Write(ctx, "data/a/b/c/d/e/f/g/h/i/j", nil), "exactly at quota")
	require.NoError(t, xs.Rm(ctx, "data/a"))
	require.NoError(t, xs.Write(ctx, "data/z/y/x/w/v/u/t/s/r/q", nil), "quota freed by rm")
	require.NoError(t, h.Dom0().Store().Write(ctx, "/a/b/c/d/e/f/g/h/i/j/k/l", nil), "dom0 has no quota")
}

func TestWatches(t *testing.T) {
	ctx, h, vm := setup(t)
	xs := vm.Store()
	dom0 := h.Dom0().Store()

	w, err := xs.Watch(ctx, "data/w")
	require.NoError(t, err)
	assert.Equal(t, "data/w", w.Path())
	assert.Equal(t, "data/w", nextEvent(t, w), "fires once when set")

	require.NoError(t, xs.Write(ctx, "data/w/x", []byte("1")))
	assert.Equal(t, "data/w/x", nextEvent(t, w), "relative watch, relative events")
	require.NoError(t, xs.Write(ctx, "data/wx", []byte("1")), "a sibling with the same prefix")
	require.NoError(t, xs.Write(ctx, "data/w", []byte("2")))
	assert.Equal(t, "data/w", nextEvent(t, w))

	abs, err := dom0.Watch(ctx, "/local/domain/1/data/w/x")
	require.NoError(t, err)
	assert.Equal(t, "/local/domain/1/data/w/x", nextEvent(t, abs))
	require.NoError(t, xs.Rm(ctx, "data/w"))
	assert.Equal(t, "data/w", nextEvent(t, w))
	assert.Equal(t, "/local/domain/1/data/w/x", nextEvent(t, abs), "removal of an ancestor fires watches below")

	require.NoError(t, w.Close(ctx))
	_, ok := <-w.C()
	assert.False(t, ok, "closed watch channel")
	require.NoError(t, w.Close(ctx), "second close is a no-op")
	require.NoError(t, abs.Close(ctx))
}

func TestWatchRespectsPermissions(t *testing.T) {
	ctx, h, vm := setup(t)
	dom0 := h.Dom0().Store()
	w, err := vm.Store().Watch(ctx, "/local/domain/0/data/vchan/1/111")
	require.NoError(t, err)
	nextEvent(t, w)

	base := "/local/domain/0/data/vchan/1/111"
	require.NoError(t, dom0.Write(ctx, base+"/secret", []byte("x")))
	require.NoError(t, dom0.Write(ctx, base+"/ring-ref", []byte("8")))
	require.NoError(t, dom0.SetPerms(ctx, base+"/ring-ref",
		xenstore.Perm{Dom: 0, Access: xenstore.AccessNone}, xenstore.Perm{Dom: 1, Access: xenstore.AccessRead}))
	assert.Equal(t, base+"/ring-ref", nextEvent(t, w), "the first event the vm may see")
}

func TestSpecialWatches(t *testing.T) {
	ctx, h, _ := setup(t)
	xs := h.Dom0().Store()
	rel, err := xs.Watch(ctx, "@releaseDomain")
	require.NoError(t, err)
	assert.Equal(t, "@releaseDomain", nextEvent(t, rel))
	intro, err := xs.Watch(ctx, "@introduceDomain")
	require.NoError(t, err)
	assert.Equal(t, "@introduceDomain", nextEvent(t, intro))

	d, err := h.CreateDomain("d")
	require.NoError(t, err)
	assert.Equal(t, "@introduceDomain", nextEvent(t, intro))
	require.NoError(t, d.Destroy())
	assert.Equal(t, "@releaseDomain", nextEvent(t, rel))
	ok, err := xs.IsDomainIntroduced(ctx, d.ID())
	require.NoError(t, err)
	assert.False(t, ok)
	_, err = xs.Read(ctx, "/local/domain/2")
	require.ErrorIs(t, err, xenstore.ENOENT, "home removed")
	_, err = d.Store().Read(ctx, "domid")
	require.Error(t, err, "the dead domain's connection is closed")
}

func TestTransactions(t *testing.T) {
	ctx, h, vm := setup(t)
	xs := vm.Store()
	w, err := xs.Watch(ctx, "data/tx")
	require.NoError(t, err)
	nextEvent(t, w)

	require.NoError(t, xs.Transaction(ctx, func(tx *xenstore.Tx) error {
		if err := tx.Write(ctx, "data/tx/a", []byte("1")); err != nil {
			return err
		}
		v, err := tx.Read(ctx, "data/tx/a")
		if err != nil || string(v) != "1" {
			return errors.New("transaction does not see its own write")
		}
		_, err = xs.Read(ctx, "data/tx/a")
		if !errors.Is(err, xenstore.ENOENT) {
			return errors.New("write visible before commit")
		}
		select {
		case p := <-w.C():
			return errors.New("event before commit: " + p)
		default:
		}
		return tx.Write(ctx, "data/tx/b", []byte("2"))
	}))
	assert.Equal(t, "data/tx/a", nextEvent(t, w), "events fire on commit")
	assert.Equal(t, "data/tx/b", nextEvent(t, w))

	// An aborted transaction leaves nothing behind.
	boom := errors.New("boom")
	err = xs.Transaction(ctx, func(tx *xenstore.Tx) error {
		require.NoError(t, tx.Write(ctx, "data/tx/c", nil))
		return boom
	})
	require.ErrorIs(t, err, boom)
	_, err = xs.Read(ctx, "data/tx/c")
	require.ErrorIs(t, err, xenstore.ENOENT)

	// A conflicting write from another connection makes the commit fail
	// with EAGAIN, and the function runs again.
	runs := 0
	err = xs.Transaction(ctx, func(tx *xenstore.Tx) error {
		runs++
		v, err := tx.Read(ctx, "data/tx/a")
		if err != nil {
			return err
		}
		if runs == 1 {
			if err := h.Dom0().Store().Write(ctx, "/local/domain/1/data/tx/a", []byte("dom0")); err != nil {
				return err
			}
		}
		return tx.Write(ctx, "data/tx/a", append(v, '+'))
	})
	require.NoError(t, err)
	assert.Equal(t, 2, runs)
	v, err := xs.Read(ctx, "data/tx/a")
	require.NoError(t, err)
	assert.Equal(t, "dom0+", string(v))

	// Unrelated changes do not conflict.
	runs = 0
	require.NoError(t, xs.Transaction(ctx, func(tx *xenstore.Tx) error {
		runs++
		if err := xs.Write(ctx, "data/elsewhere", nil); err != nil {
			return err
		}
		return tx.Write(ctx, "data/tx/d", nil)
	}))
	assert.Equal(t, 1, runs)

	// Permission errors inside a transaction are reported as such.
	err = xs.Transaction(ctx, func(tx *xenstore.Tx) error {
		return tx.Write(ctx, "/local/domain/0/x", nil)
	})
	require.ErrorIs(t, err, xenstore.EACCES)
}

func TestTransactionQuotaRace(t *testing.T) {
	lim := sim.DefaultLimits()
	lim.StoreNodes = 9 // home dirs only leave a little room
	h := sim.NewWithLimits(lim)
	t.Cleanup(h.Close)
	vm, err := h.CreateDomain("vm")
	require.NoError(t, err)
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	xs := vm.Store()
	second := xenstore.NewClient(vm.ConnectStore())
	defer second.Close()

	// The transaction creates nodes within quota, but meanwhile another
	// connection of the same domain fills it: the commit must fail cleanly.
	err = xs.Transaction(ctx, func(tx *xenstore.Tx) error {
		if err := tx.Write(ctx, "data/t1/a/b", nil); err != nil {
			return err
		}
		return second.Write(ctx, "device/u1/a/b", nil)
	})
	require.ErrorIs(t, err, xenstore.ENOSPC)
	_, err = xs.Read(ctx, "data/t1")
	require.ErrorIs(t, err, xenstore.ENOENT, "nothing half-committed")
}

func TestDomainPathKeyRoundTrip(t *testing.T) {
	ctx, h, vm := setup(t)
	// dom0 prepares a node for the vm the way the toolstack does.
	dom0 := h.Dom0().Store()
	p := "/local/domain/1/device/vif/0/state"
	require.NoError(t, dom0.Write(ctx, p, []byte("1")))
	require.NoError(t, dom0.SetPerms(ctx, p, xenstore.Perm{Dom: vm.ID(), Access: xenstore.AccessNone}))
	require.NoError(t, vm.Store().Write(ctx, "device/vif/0/state", []byte("4")))
	v, err := dom0.Read(ctx, p)
	require.NoError(t, err)
	assert.Equal(t, "4", string(v))
	assert.Equal(t, xen.DomID(1), vm.ID())
}
