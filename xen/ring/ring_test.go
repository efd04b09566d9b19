package ring

import (
	"encoding/binary"
	"testing"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"qfw/xen"
)

// Test layouts with the netif TX sizes: 12-byte requests, 4-byte responses.
type (
	txReq [12]byte
	txRsp [4]byte
)

func req(id uint16) txReq {
	var r txReq
	binary.LittleEndian.PutUint16(r[8:], id)
	return r
}

func (r txReq) id() uint16 { return binary.LittleEndian.Uint16(r[8:]) }

func rsp(id uint16) txRsp {
	var r txRsp
	binary.LittleEndian.PutUint16(r[0:], id)
	return r
}

func (r txRsp) id() uint16 { return binary.LittleEndian.Uint16(r[0:]) }

func newPair(t testing.TB) (*Front[txReq, txRsp], *Back[txReq, txRsp], []byte) {
	page := make([]byte, xen.PageSize)
	for i := range page {
		page[i] = 0xee // SHARED_RING_INIT must clear the header
	}
	f, err := NewFront[txReq, txRsp](page)
	require.NoError(t, err)
	b, err := NewBack[txReq, txRsp](page)
	require.NoError(t, err)
	return f, b, page
}

func TestEntries(t *testing.T) {
	// Values printed by a C program against Xen's headers (spec 1.2).
	assert.Equal(t, 256, Entries(12), "netif TX")
	assert.Equal(t, 256, Entries(8), "netif RX")
	assert.Equal(t, 128, Entries(16), "netif ctrl")
	assert.Equal(t, 1, Entries(xen.PageSize-HeaderLen))
}

func TestSharedRingInit(t *testing.T) {
	f, b, page := newPair(t)
	assert.Equal(t, 256, f.Size())
	assert.Equal(t, 256, b.Size())
	assert.Equal(t, []byte{0, 0, 0, 0, 1, 0, 0, 0, 0, 0, 0, 0, 1, 0, 0, 0}, page[:16])
	assert.Equal(t, make([]byte, HeaderLen-16), page[16:HeaderLen], "pvt and padding zeroed")
	assert.Equal(t, byte(0xee), page[HeaderLen], "slots untouched")
}

func TestNewRejects(t *testing.T) {
	page := make([]byte, xen.PageSize)
	_, err := NewFront[txReq, txRsp](page[:100])
	assert.Error(t, err, "short page")
	_, err = NewFront[[4100]byte, txRsp](page)
	assert.Error(t, err, "slot larger than the page")
	_, err = NewBack[[3]uint16, txRsp](page)
	assert.Error(t, err, "not a byte array")
	_, err = NewBack[*byte, txRsp](page)
	assert.Error(t, err, "pointers must never alias peer memory")
	_, err = NewBack[txReq, [0]byte](page)
	assert.Error(t, err, "empty slot")
	big := make([]byte, xen.PageSize+1)
	_, err = NewBack[txReq, txRsp](big[1:])
	assert.Error(t, err, "misaligned page")
}

func TestRequestResponseFlow(t *testing.T) {
	f, b, page := newPair(t)
	require.Equal(t, 256, f.Free())
	for i := range 3 {
		require.NoError(t, f.Produce(req(uint16(i))))
	}
	n, err := b.Pending()
	require.NoError(t, err)
	assert.Zero(t, n, "not visible before Push")
	assert.True(t, f.Push(), "the first push always notifies (req_event starts at 1)")
	assert.Equal(t, uint32(3), binary.LittleEndian.Uint32(page[offReqProd:]))

	require.NoError(t, f.Produce(req(3)))
	assert.False(t, f.Push(), "the backend did not ask again")

	for i := range 4 {
		r, ok, err := b.Consume()
		require.NoError(t, err)
		require.True(t, ok)
		assert.Equal(t, uint16(i), r.id())
		require.NoError(t, b.Produce(rsp(r.id()+100)))
	}
	_, ok, err := b.Consume()
	require.NoError(t, err)
	assert.False(t, ok)
	require.ErrorIs(t, b.Produce(rsp(9)), ErrNoRequest)
	assert.True(t, b.Push(), "rsp_event starts at 1")

	more, err := b.FinalCheck()
	require.NoError(t, err)
	assert.False(t, more)
	require.NoError(t, f.Produce(req(4)))
	assert.True(t, f.Push(), "FinalCheck asked for the next request")
	more, err = b.FinalCheck()
	require.NoError(t, err)
	assert.True(t, more, "FinalCheck sees work that is already there")

	for i := range 4 {
		r, ok, err := f.Consume()
		require.NoError(t, err)
		require.True(t, ok)
		assert.Equal(t, uint16(100+i), r.id())
	}
	_, ok, err = f.Consume()
	require.NoError(t, err)
	assert.False(t, ok)
	more, err = f.FinalCheck()
	require.NoError(t, err)
	assert.False(t, more)
	assert.Equal(t, uint32(5), binary.LittleEndian.Uint32(page[offRspEvent:]))
}

func TestFullRing(t *testing.T) {
	f, b, _ := newPair(t)
	for i := range f.Size() {
		require.NoError(t, f.Produce(req(uint16(i))))
	}
	require.ErrorIs(t, f.Produce(req(0)), ErrFull)
	f.Push()
	r, ok, err := b.Consume()
	require.NoError(t, err)
	require.True(t, ok)
	require.ErrorIs(t, f.Produce(req(0)), ErrFull, "a consumed request still owns its slot until answered")
	require.NoError(t, b.Produce(rsp(r.id())))
	b.Push()
	_, ok, err = f.Consume()
	require.NoError(t, err)
	require.True(t, ok)
	assert.Equal(t, 1, f.Free())
}

func TestIndicesWrapAround(t *testing.T) {
	f, b, page := newPair(t)
	// Start both sides just below 2^32, as after a long uptime.
	const start = 1<<32 - 5
	for _, e := range []*endpoint{&f.e, &b.e} {
		e.prodPvt, e.pushed, e.cons = start, start, start
	}
	for _, off := range []int{offReqProd, offRspProd} {
		binary.LittleEndian.PutUint32(page[off:], start)
	}
	binary.LittleEndian.PutUint32(page[offReqEvent:], start+1)
	binary.LittleEndian.PutUint32(page[offRspEvent:], start+1)

	for round := range 3 {
		for i := range 10 {
			require.NoError(t, f.Produce(req(uint16(round*10+i))))
		}
		assert.True(t, f.Push(), "round %d", round)
		for i := range 10 {
			r, ok, err := b.Consume()
			require.NoError(t, err)
			require.True(t, ok)
			require.Equal(t, uint16(round*10+i), r.id())
			require.NoError(t, b.Produce(rsp(r.id())))
		}
		assert.True(t, b.Push())
		for i := range 10 {
			r, ok, err := f.Consume()
			require.NoError(t, err)
			require.True(t, ok)
			require.Equal(t, uint16(round*10+i), r.id())
		}
		more, err := b.FinalCheck()
		require.NoError(t, err)
		require.False(t, more)
		more, err = f.FinalCheck()
		require.NoError(t, err)
		require.False(t, more)
	}
	assert.Equal(t, uint32(25), binary.LittleEndian.Uint32(page[offReqProd:]))
}

func TestHostilePeers(t *testing.T) {
	t.Run("frontend publishes more requests than slots", func(t *testing.T) {
		f, b, page := newPair(t)
		require.NoError(t, f.Produce(req(1)))
		f.Push()
		_, _, err := b.Consume()
		require.NoError(t, err)
		// One consumed, unanswered request owns a slot: 256 more overflow.
		binary.LittleEndian.PutUint32(page[offReqProd:], 1+256)
		_, _, err = b.Consume()
		require.ErrorIs(t, err, ErrOverflow)
		binary.LittleEndian.PutUint32(page[offReqProd:], 2)
		_, _, err = b.Consume()
		require.ErrorIs(t, err, ErrOverflow, "the ring stays broken")
		_, err = b.FinalCheck()
		require.ErrorIs(t, err, ErrOverflow)
	})
	t.Run("frontend at the limit is fine", func(t *testing.T) {
		_, b, page := newPair(t)
		binary.LittleEndian.PutUint32(page[offReqProd:], 256)
		n, err := b.Pending()
		require.NoError(t, err)
		assert.Equal(t, 256, n)
	})
	t.Run("backend answers requests never pushed", func(t *testing.T) {
		f, _, page := newPair(t)
		require.NoError(t, f.Produce(req(1)))
		f.Push()
		require.NoError(t, f.Produce(req(2))) // produced, not pushed
		binary.LittleEndian.PutUint32(page[offRspProd:], 2)
		_, _, err := f.Consume()
		require.ErrorIs(t, err, ErrOverflow)
	})
	t.Run("backend moves its producer backwards", func(t *testing.T) {
		f, _, page := newPair(t)
		binary.LittleEndian.PutUint32(page[offRspProd:], 1<<32-1)
		_, err := f.Pending()
		require.ErrorIs(t, err, ErrOverflow)
	})
}

// FuzzBack drives a backend against a frontend that writes arbitrary
// producer indices and slot contents: the backend must never panic, never
// hand out more than a ring's worth of requests, and stop at overflow.
func FuzzBack(f *testing.F) {
	f.Add([]byte{1, 2, 3, 4, 5, 6, 7, 8})
	f.Add([]byte{0xff, 0xff, 0xff, 0xff, 0, 1, 0, 0})
	f.Fuzz(func(t *testing.T, data []byte) {
		page := make([]byte, xen.PageSize)
		b, err := NewBack[txReq, txRsp](page)
		if err != nil {
			t.Fatal(err)
		}
		copy(page[HeaderLen:], data)
		outstanding := 0
		for len(data) >= 4 {
			prod := binary.LittleEndian.Uint32(data)
			data = data[4:]
			binary.LittleEndian.PutUint32(page[offReqProd:], prod)
			for range 300 {
				_, ok, err := b.Consume()
				if err != nil {
					return
				}
				if !ok {
					break
				}
				outstanding++
				if outstanding > b.Size() {
					t.Fatalf("%d requests outstanding in a %d-slot ring", outstanding, b.Size())
				}
			}
			if len(data) > 0 && data[0]&1 == 1 && outstanding > 0 {
				if err := b.Produce(txRsp{}); err != nil {
					t.Fatal(err)
				}
				outstanding--
				b.Push()
			}
		}
	})
}

func BenchmarkRoundTrip(b *testing.B) {
	f, bk, _ := newPair(b)
	b.ReportAllocs()
	for i := range b.N {
		if err := f.Produce(req(uint16(i))); err != nil {
			b.Fatal(err)
		}
		f.Push()
		r, _, err := bk.Consume()
		if err != nil {
			b.Fatal(err)
		}
		if err := bk.Produce(rsp(r.id())); err != nil {
			b.Fatal(err)
		}
		bk.Push()
		if _, _, err := f.Consume(); err != nil {
			b.Fatal(err)
		}
	}
}

func BenchmarkBatch64(b *testing.B) {
	f, bk, _ := newPair(b)
	b.ReportAllocs()
	for range b.N {
		for j := range 64 {
			_ = f.Produce(req(uint16(j)))
		}
		f.Push()
		for {
			r, ok, _ := bk.Consume()
			if !ok {
				break
			}
			_ = bk.Produce(rsp(r.id()))
		}
		bk.Push()
		for {
			if _, ok, _ := f.Consume(); !ok {
				break
			}
		}
	}
	b.ReportMetric(float64(b.Elapsed().Nanoseconds())/float64(b.N*64), "ns/entry")
}
