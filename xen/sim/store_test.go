package sim_test

import (
	"bytes"
	"context"
	"io"
	"strconv"
	"testing"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"qfw/xen/sim"
	"qfw/xen/xenstore"
)

// raw sends one message on a raw connection and returns the next reply.
func raw(t *testing.T, rw io.ReadWriter, m xenstore.Msg) xenstore.Msg {
	t.Helper()
	b, err := xenstore.AppendMsg(nil, m)
	require.NoError(t, err)
	_, err = rw.Write(b)
	require.NoError(t, err)
	r, err := xenstore.ReadMsg(rw, make([]byte, xenstore.HeaderLen+xenstore.MaxPayload))
	require.NoError(t, err)
	return r
}

func errnoOf(t *testing.T, m xenstore.Msg) xenstore.Errno {
	t.Helper()
	require.Equal(t, xenstore.OpError, m.Op, "payload %q", m.Payload)
	e, err := xenstore.ParseError(m.Payload)
	require.NoError(t, err)
	return e
}

func TestStoreRejectsMalformedRequests(t *testing.T) {
	h := newHV(t)
	vm := newDomain(t, h, "vm")
	rw := vm.ConnectStore()
	defer rw.Close()

	for _, tc := range []struct {
		name string
		m    xenstore.Msg
		want xenstore.Errno
	}{
		{"unterminated path", xenstore.Msg{Op: xenstore.OpRead, Payload: []byte("domid")}, xenstore.EINVAL},
		{"two paths for READ", xenstore.Msg{Op: xenstore.OpRead, Payload: []byte("a\x00b\x00")}, xenstore.EINVAL},
		{"write without separator", xenstore.Msg{Op: xenstore.OpWrite, Payload: []byte("data/x")}, xenstore.EINVAL},
		{"bad perms", xenstore.Msg{Op: xenstore.OpSetPerms, Payload: []byte("data\x00z1\x00")}, xenstore.EINVAL},
		{"no perms", xenstore.Msg{Op: xenstore.OpSetPerms, Payload: []byte("data\x00")}, xenstore.EINVAL},
		{"unknown transaction", xenstore.Msg{Op: xenstore.OpRead, TxID: 77, Payload: []byte("domid\x00")}, xenstore.ENOENT},
		{"nested transaction", xenstore.Msg{Op: xenstore.OpTransactionStart, TxID: 3, Payload: []byte("\x00")}, xenstore.EBUSY},
		{"unknown op", xenstore.Msg{Op: 99, Payload: []byte("\x00")}, xenstore.ENOSYS},
		{"privileged op", xenstore.Msg{Op: xenstore.OpIntroduce, Payload: []byte("1\x002\x003\x00")}, xenstore.EACCES},
		{"watch without token", xenstore.Msg{Op: xenstore.OpWatch, Payload: []byte("data\x00")}, xenstore.EINVAL},
		{"watch with huge token", xenstore.Msg{Op: xenstore.OpWatch, Payload: append(append([]byte("data\x00"), bytes.Repeat([]byte("t"), 300)...), 0)}, xenstore.EINVAL},
		{"unwatch unknown", xenstore.Msg{Op: xenstore.OpUnwatch, Payload: []byte("data\x00t\x00")}, xenstore.ENOENT},
		{"bad domid", xenstore.Msg{Op: xenstore.OpGetDomainPath, Payload: []byte("x\x00")}, xenstore.EINVAL},
		{"path too long", xenstore.Msg{Op: xenstore.OpRead, Payload: append(bytes.Repeat([]byte("a"), xenstore.MaxRelPath+1), 0)}, xenstore.EINVAL},
	} {
		t.Run(tc.name, func(t *testing.T) {
			m := tc.m
			m.ReqID = 5
			r := raw(t, rw, m)
			assert.Equal(t, uint32(5), r.ReqID, "req_id echoed")
			assert.Equal(t, tc.want, errnoOf(t, r))
		})
	}

	// Bad transaction ends.
	r := raw(t, rw, xenstore.Msg{Op: xenstore.OpTransactionStart, Payload: []byte("\x00")})
	require.Equal(t, xenstore.OpTransactionStart, r.Op)
	id, err := xenstore.FirstString(r.Payload)
	require.NoError(t, err)
	tx, err := strconv.ParseUint(id, 10, 32)
	require.NoError(t, err)
	r = raw(t, rw, xenstore.Msg{Op: xenstore.OpTransactionEnd, TxID: uint32(tx), Payload: []byte("X\x00")})
	assert.Equal(t, xenstore.EINVAL, errnoOf(t, r))
	r = raw(t, rw, xenstore.Msg{Op: xenstore.OpTransactionEnd, TxID: uint32(tx) + 1, Payload: []byte("T\x00")})
	assert.Equal(t, xenstore.ENOENT, errnoOf(t, r))

	// A payload over the limit gets the connection dropped.
	hdr := make([]byte, xenstore.HeaderLen)
	xenstore.Header(hdr).SetLen(xenstore.MaxPayload + 1)
	_, err = rw.Write(hdr)
	require.NoError(t, err)
	_, err = xenstore.ReadMsg(rw, make([]byte, xenstore.HeaderLen+xenstore.MaxPayload))
	require.Error(t, err)

	// The domain's own client is unaffected.
	_, err = vm.Store().Read(ctxT(t), "domid")
	require.NoError(t, err)
}

func TestStoreLimitsPerConnection(t *testing.T) {
	lim := sim.DefaultLimits()
	lim.StoreWatches, lim.StoreTxs, lim.StoreTxOps = 2, 1, 2
	h := sim.NewWithLimits(lim)
	t.Cleanup(h.Close)
	vm := newDomain(t, h, "vm")
	ctx := ctxT(t)
	xs := vm.Store()

	w1, err := xs.Watch(ctx, "data")
	require.NoError(t, err)
	_, err = xs.Watch(ctx, "device")
	require.NoError(t, err)
	_, err = xs.Watch(ctx, "control")
	require.ErrorIs(t, err, xenstore.ENOSPC)
	require.NoError(t, w1.Close(ctx))
	_, err = xs.Watch(ctx, "control")
	require.NoError(t, err, "closing a watch frees its slot")

	err = xs.Transaction(ctx, func(tx *xenstore.Tx) error {
		return xs.Transaction(ctx, func(*xenstore.Tx) error { return nil })
	})
	require.ErrorIs(t, err, xenstore.ENOSPC, "one open transaction per connection")
	err = xs.Transaction(ctx, func(tx *xenstore.Tx) error {
		for i := range 3 {
			if err := tx.Write(ctx, "data/"+strconv.Itoa(i), nil); err != nil {
				return err
			}
		}
		return nil
	})
	require.ErrorIs(t, err, xenstore.ENOSPC, "requests per transaction")

	// Directory listings larger than a payload are refused, not truncated.
	dom0 := h.Dom0().Store()
	name := string(bytes.Repeat([]byte("n"), 200))
	for i := range 21 {
		require.NoError(t, dom0.Write(ctx, "/big/"+name+strconv.Itoa(i), nil))
	}
	_, err = dom0.Directory(ctx, "/big")
	require.ErrorIs(t, err, xenstore.E2BIG)
}

func TestStoreDropsSlowReader(t *testing.T) {
	lim := sim.DefaultLimits()
	lim.StoreQueue = 4
	h := sim.NewWithLimits(lim)
	t.Cleanup(h.Close)
	vm := newDomain(t, h, "vm")
	ctx := ctxT(t)

	// A connection that sets a watch and then never reads.
	rw := vm.ConnectStore()
	defer rw.Close()
	b, err := xenstore.AppendMsg(nil, xenstore.Msg{Op: xenstore.OpWatch, Payload: []byte("data\x00t\x00")})
	require.NoError(t, err)
	_, err = rw.Write(b)
	require.NoError(t, err)

	// Each write fires the watch; once more events are pending than the
	// queue holds, the server gives up on the connection.
	xs := vm.Store()
	for i := range lim.StoreQueue + 4 {
		require.NoError(t, xs.Write(ctx, "data/x", []byte(strconv.Itoa(i))), "the well-behaved client keeps working")
	}
	buf := make([]byte, xenstore.HeaderLen+xenstore.MaxPayload)
	for range lim.StoreQueue + 2 {
		if _, err = xenstore.ReadMsg(rw, buf); err != nil {
			break
		}
	}
	require.ErrorIs(t, err, io.EOF, "what was queued, then the end")
}

// FuzzStore feeds a simulated xenstored arbitrary bytes from an unprivileged
// domain; it must never panic, and must keep serving other connections.
func FuzzStore(f *testing.F) {
	for _, m := range []xenstore.Msg{
		{Op: xenstore.OpWrite, Payload: []byte("data/a\x00v")},
		{Op: xenstore.OpWatch, Payload: []byte("data\x00t\x00")},
		{Op: xenstore.OpTransactionStart, Payload: []byte("\x00")},
		{Op: xenstore.OpSetPerms, Payload: []byte("data/a\x00n1\x00r0\x00")},
		{Op: xenstore.OpRm, Payload: []byte("data\x00")},
		{Op: xenstore.OpTransactionEnd, TxID: 1, Payload: []byte("T\x00")},
	} {
		b, _ := xenstore.AppendMsg(nil, m)
		f.Add(b)
	}
	h := sim.New()
	defer h.Close()
	vm, err := h.CreateDomain("fuzz")
	if err != nil {
		f.Fatal(err)
	}
	f.Fuzz(func(t *testing.T, data []byte) {
		rw := vm.ConnectStore()
		go io.Copy(io.Discard, rw)
		rw.Write(data)
		rw.Close()
		ctx, cancel := context.WithTimeout(context.Background(), testTimeout)
		defer cancel()
		if _, err := h.Dom0().Store().Read(ctx, "/local/domain/0/domid"); err != nil {
			t.Fatalf("xenstored stopped serving: %v", err)
		}
	})
}
