package ring_test

import (
	"context"
	"encoding/binary"
	"testing"
	"time"

	"github.com/stretchr/testify/require"

	"qfw/xen"
	"qfw/xen/ring"
	"qfw/xen/sim"
)

type (
	rxReq [8]byte
	rxRsp [8]byte
)

// A frontend in a VM and a backend in dom0 exchange requests and responses
// through a granted page and an event channel, the way netfront and netback
// do, sleeping only after FinalCheck. Run with -race: the index protocol
// must order every slot access.
func TestFrontBackOverSim(t *testing.T) {
	h := sim.New()
	t.Cleanup(h.Close)
	vm, err := h.CreateDomain("vm")
	require.NoError(t, err)
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()

	share, err := vm.Share(xen.Dom0, 1, true)
	require.NoError(t, err)
	fevt, err := vm.AllocUnbound(xen.Dom0)
	require.NoError(t, err)
	front, err := ring.NewFront[rxReq, rxRsp](share.Pages()[0])
	require.NoError(t, err)

	m, err := h.Dom0().Map(vm.ID(), share.Refs(), true)
	require.NoError(t, err)
	bevt, err := h.Dom0().BindInterdomain(vm.ID(), fevt.Port())
	require.NoError(t, err)
	back, err := ring.NewBack[rxReq, rxRsp](m.Pages()[0])
	require.NoError(t, err)

	const total = 50_000
	backErr := make(chan error, 1)
	go func() { // backend: answer every request with its id + 1
		answered := 0
		for answered < total {
			r, ok, err := back.Consume()
			if err != nil {
				backErr <- err
				return
			}
			if ok {
				var out rxRsp
				binary.LittleEndian.PutUint32(out[:], binary.LittleEndian.Uint32(r[:])+1)
				if err := back.Produce(out); err != nil {
					backErr <- err
					return
				}
				answered++
				if back.Push() {
					bevt.Notify()
				}
				continue
			}
			if more, err := back.FinalCheck(); more || err != nil {
				continue
			}
			select {
			case <-bevt.C():
			case <-ctx.Done():
				backErr <- ctx.Err()
				return
			}
		}
		backErr <- nil
	}()

	sent, got := 0, 0
	for got < total {
		progressed := false
		for sent < total && front.Free() > 0 {
			var r rxReq
			binary.LittleEndian.PutUint32(r[:], uint32(sent))
			require.NoError(t, front.Produce(r))
			sent++
			progressed = true
		}
		if front.Push() {
			require.NoError(t, fevt.Notify())
		}
		for {
			r, ok, err := front.Consume()
			require.NoError(t, err)
			if !ok {
				break
			}
			require.Equal(t, uint32(got+1), binary.LittleEndian.Uint32(r[:]), "responses in request order")
			got++
			progressed = true
		}
		if progressed {
			continue
		}
		if more, err := front.FinalCheck(); more || err != nil {
			require.NoError(t, err)
			continue
		}
		select {
		case <-fevt.C():
		case <-ctx.Done():
			t.Fatalf("frontend stalled at %d/%d", got, total)
		}
	}
	require.NoError(t, <-backErr)
}
