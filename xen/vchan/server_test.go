package vchan

import (
	"context"
	"testing"
	"time"

	"github.com/stretchr/testify/require"

	"qfw/xen/sim"
)

// An unpublish whose commit went through but whose reply was lost (its
// context was cancelled) is retried by Close; by then the directory is gone,
// and that must count as done.
func TestUnpublishIsIdempotent(t *testing.T) {
	h := sim.New()
	t.Cleanup(h.Close)
	vm, err := h.CreateDomain("vm")
	require.NoError(t, err)
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	r := &rendezvous{xs: h.Dom0().Store(), self: 0, client: vm.ID(), port: 111}
	require.NoError(t, r.publish(ctx, 8, 1))
	require.NoError(t, h.Dom0().Store().Rm(ctx, "data/vchan/1"))
	require.NoError(t, r.unpublish(ctx))
	require.True(t, r.gone)
}
