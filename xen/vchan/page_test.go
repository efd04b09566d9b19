package vchan

import (
	"bytes"
	"testing"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
)

func TestRingOrders(t *testing.T) {
	for _, tc := range []struct{ left, right, lo, ro int }{
		{4096, 4096, 12, 12}, // QubesDB
		{1024, 2048, 10, 11},
		{0, 0, 10, 11},
		{2048, 1024, 11, 10},
		{2048, 2048, 11, 12},
		{2048, 5000, 11, 13},
		{5000, 2048, 13, 11},
		{4097, 65536, 13, 16},
		{MaxRingSize, MaxRingSize, 20, 20},
	} {
		lo, ro := ringOrders(tc.left, tc.right)
		assert.Equal(t, [2]int{tc.lo, tc.ro}, [2]int{lo, ro}, "%d/%d", tc.left, tc.right)
		assert.NoError(t, checkOrders(lo, ro), "the server's choice passes the client's check")
		assert.GreaterOrEqual(t, 1<<lo, tc.left)
		assert.GreaterOrEqual(t, 1<<ro, tc.right)
	}
}

func TestCheckOrders(t *testing.T) {
	for _, tc := range []struct {
		lo, ro int
		ok     bool
	}{
		{12, 12, true},
		{20, 20, true},  // 512 grants end at 2072: fine without in-page rings
		{11, 20, true},  // 256 grants end at 1048, the ring starts at 2048
		{10, 18, true},  // 64 grants end at 280, the ring starts at 1024
		{10, 20, false}, // 256 grants run into the ring at 1024
		{9, 12, false},
		{12, 21, false},
		{0, 0, false},
		{65535, 12, false},
		{10, 10, false}, // both rings in one in-page slot
		{11, 11, false},
	} {
		err := checkOrders(tc.lo, tc.ro)
		if tc.ok {
			assert.NoError(t, err, "%d/%d", tc.lo, tc.ro)
		} else {
			assert.ErrorIs(t, err, ErrCorrupt, "%d/%d", tc.lo, tc.ro)
		}
	}
}

func TestRingCopyWraps(t *testing.T) {
	pages := [][]byte{make([]byte, 4096), make([]byte, 4096)}
	ctrl := make([]byte, 4096)
	r := newRing(ctrl, offLeftCons, offLeftProd, 13, pages)
	require.Equal(t, uint32(8192), r.size)
	msg := bytes.Repeat([]byte("0123456789"), 300) // 3000 bytes
	pos := uint32(1<<32 - 1000)                    // wraps the index and the ring
	r.copyIn(pos, msg)
	assert.Equal(t, msg[:1000], pages[1][4096-1000:])
	assert.Equal(t, msg[1000:], pages[0][:2000])
	out := make([]byte, len(msg))
	r.copyOut(out, pos)
	assert.Equal(t, msg, out)

	in := newRing(ctrl, offRightCons, offRightProd, 10, nil)
	require.Equal(t, uint32(1024), in.size)
	in.copyIn(1020, []byte("abcdefgh"))
	assert.Equal(t, "abcd", string(ctrl[1024+1020:2048]))
	assert.Equal(t, "efgh", string(ctrl[1024:1028]))
}
