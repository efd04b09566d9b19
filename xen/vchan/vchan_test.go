package vchan_test

import (
	"bytes"
	"context"
	"encoding/binary"
	"errors"
	"io"
	"math/rand/v2"
	"strconv"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"qfw/xen"
	"qfw/xen/sim"
	"qfw/xen/vchan"
	"qfw/xen/xenstore"
)

const testTimeout = 30 * time.Second

func setup(t *testing.T) (context.Context, *sim.Hypervisor, *sim.Domain) {
	t.Helper()
	h := sim.New()
	t.Cleanup(h.Close)
	vm, err := h.CreateDomain("vm")
	require.NoError(t, err)
	ctx, cancel := context.WithTimeout(context.Background(), testTimeout)
	t.Cleanup(cancel)
	return ctx, h, vm
}

// pair connects a server in srvDom to a client in cliDom.
func pair(t *testing.T, ctx context.Context, srvDom, cliDom xen.Domain, port, readMin, writeMin int) (srv, cli *vchan.Conn) {
	t.Helper()
	srv, err := vchan.Listen(ctx, srvDom, cliDom.ID(), port, readMin, writeMin)
	require.NoError(t, err)
	cli, err = vchan.Dial(ctx, cliDom, srvDom.ID(), port)
	require.NoError(t, err)
	t.Cleanup(func() { srv.Close(); cli.Close() })
	return srv, cli
}

// guard closes the connections if ctx ends first, so that a hung test fails
// instead of blocking forever.
func guard(ctx context.Context, cs ...io.Closer) (stop func()) {
	done := make(chan struct{})
	go func() {
		select {
		case <-ctx.Done():
			for _, c := range cs {
				c.Close()
			}
		case <-done:
		}
	}()
	return func() { close(done) }
}

func writeChunks(w io.Writer, data []byte, rng *rand.Rand, maxChunk int) error {
	for len(data) > 0 {
		n := min(len(data), 1+rng.IntN(maxChunk))
		k, err := w.Write(data[:n])
		if err != nil {
			return err
		}
		if k != n {
			return io.ErrShortWrite
		}
		data = data[n:]
	}
	return nil
}

// readChunks reads until EOF (or error) with random buffer sizes.
func readChunks(r io.Reader, rng *rand.Rand, maxChunk int) ([]byte, error) {
	var got []byte
	buf := make([]byte, maxChunk)
	for {
		n, err := r.Read(buf[:1+rng.IntN(maxChunk)])
		got = append(got, buf[:n]...)
		if err != nil {
			return got, err
		}
	}
}

func randomBytes(seed uint64, n int) []byte {
	b := make([]byte, n)
	rng := rand.New(rand.NewPCG(seed, 1))
	for i := range b {
		b[i] = byte(rng.Uint32())
	}
	return b
}

func TestExchangeMegabytesBothWays(t *testing.T) {
	for _, tc := range []struct {
		name              string
		readMin, writeMin int
	}{
		{"qubesdb 4096/4096", 4096, 4096},
		{"in-page 1024/2048", 1024, 2048},
		{"in-page 2048/1024", 2048, 1024},
		{"mixed 2048/64KiB", 2048, 65536},
		{"large 1MiB/8KiB", vchan.MaxRingSize, 8192},
	} {
		t.Run(tc.name, func(t *testing.T) {
			ctx, h, vm := setup(t)
			srv, cli := pair(t, ctx, h.Dom0(), vm, 111, tc.readMin, tc.writeMin)
			defer guard(ctx, srv, cli)()

			const size = 3 << 20
			up, down := randomBytes(1, size), randomBytes(2, size)
			type result struct {
				got []byte
				err error
			}
			upGot, downGot := make(chan result, 1), make(chan result, 1)
			writeErr := make(chan error, 2)
			go func() { // client -> server
				err := writeChunks(cli, up, rand.New(rand.NewPCG(3, 0)), 9000)
				writeErr <- err
			}()
			go func() { // server -> client
				writeErr <- writeChunks(srv, down, rand.New(rand.NewPCG(4, 0)), 9000)
			}()
			read := func(r io.Reader, seed uint64, out chan<- result) {
				rng := rand.New(rand.NewPCG(seed, 0))
				var got []byte
				buf := make([]byte, 7000)
				for len(got) < size {
					n, err := r.Read(buf[:1+rng.IntN(len(buf))])
					got = append(got, buf[:n]...)
					if err != nil {
						out <- result{got, err}
						return
					}
				}
				out <- result{got, nil}
			}
			go read(srv, 5, upGot)
			go read(cli, 6, downGot)

			for range 2 {
				require.NoError(t, <-writeErr)
			}
			u, d := <-upGot, <-downGot
			require.NoError(t, u.err)
			require.NoError(t, d.err)
			assert.True(t, bytes.Equal(up, u.got), "client to server stream differs")
			assert.True(t, bytes.Equal(down, d.got), "server to client stream differs")
		})
	}
}

func TestPeerClosesMidStream(t *testing.T) {
	t.Run("client closes after writing", func(t *testing.T) {
		ctx, h, vm := setup(t)
		srv, cli := pair(t, ctx, h.Dom0(), vm, 111, 4096, 4096)
		defer guard(ctx, srv, cli)()
		data := randomBytes(7, 300_000)
		go func() {
			writeChunks(cli, data, rand.New(rand.NewPCG(8, 0)), 5000)
			cli.Close()
		}()
		got, err := readChunks(srv, rand.New(rand.NewPCG(9, 0)), 3000)
		require.ErrorIs(t, err, io.EOF, "EOF only after the data")
		assert.True(t, bytes.Equal(data, got), "got %d of %d bytes", len(got), len(data))
		_, err = srv.Write([]byte("x"))
		require.ErrorIs(t, err, vchan.ErrPeerClosed)
	})

	t.Run("server closes while the client is blocked writing", func(t *testing.T) {
		ctx, h, vm := setup(t)
		srv, cli := pair(t, ctx, h.Dom0(), vm, 111, 4096, 4096)
		defer guard(ctx, srv, cli)()
		_, err := srv.Write([]byte("last words"))
		require.NoError(t, err)
		wrote := make(chan error, 1)
		go func() {
			n, err := cli.Write(make([]byte, 100_000)) // the ring holds 4096
			if n >= 100_000 {
				err = errors.New("wrote everything into a closed peer")
			}
			wrote <- err
		}()
		got := make([]byte, 100)
		n, err := srv.Read(got) // the client is connected and writing
		require.NoError(t, err)
		require.NotZero(t, n)
		require.NoError(t, srv.Close())
		require.ErrorIs(t, <-wrote, vchan.ErrPeerClosed)

		rest, err := readChunks(cli, rand.New(rand.NewPCG(1, 0)), 4)
		require.ErrorIs(t, err, io.EOF)
		assert.Equal(t, "last words", string(rest))
	})
}

func TestPeerDomainDies(t *testing.T) {
	ctx, h, vm := setup(t)
	other, err := h.CreateDomain("server")
	require.NoError(t, err)

	// The vm is the client of dom0 and the server for `other`.
	srv0, cli0 := pair(t, ctx, h.Dom0(), vm, 111, 4096, 4096)
	srv1, cli1 := pair(t, ctx, vm, other, 512, 4096, 4096)
	defer guard(ctx, srv0, cli0, srv1, cli1)()
	_, err = cli0.Write([]byte("before"))
	require.NoError(t, err)

	blocked := make(chan error, 1)
	go func() {
		_, err := io.ReadFull(cli1, make([]byte, 10))
		blocked <- err
	}()
	require.NoError(t, vm.Destroy())

	got, err := readChunks(srv0, rand.New(rand.NewPCG(1, 0)), 100)
	require.ErrorIs(t, err, io.EOF, "dom0 sees the client die")
	assert.Equal(t, "before", string(got))
	_, err = srv0.Write([]byte("x"))
	require.ErrorIs(t, err, vchan.ErrPeerClosed)

	require.ErrorIs(t, <-blocked, io.EOF, "a blocked reader wakes when the server domain dies")
	_, err = cli1.Write([]byte("x"))
	require.ErrorIs(t, err, vchan.ErrPeerClosed)
	require.NoError(t, srv0.Close())
	require.NoError(t, cli1.Close())
}

func TestDialBeforeListen(t *testing.T) {
	ctx, h, vm := setup(t)
	dialed := make(chan *vchan.Conn, 1)
	dialErr := make(chan error, 1)
	go func() {
		c, err := vchan.Dial(ctx, vm, xen.Dom0, 111)
		dialErr <- err
		dialed <- c
	}()
	srv, err := vchan.Listen(ctx, h.Dom0(), vm.ID(), 111, 4096, 4096)
	require.NoError(t, err)
	defer srv.Close()
	require.NoError(t, <-dialErr)
	cli := <-dialed
	defer cli.Close()
	_, err = srv.Write([]byte("hi"))
	require.NoError(t, err)
	buf := make([]byte, 10)
	n, err := cli.Read(buf)
	require.NoError(t, err)
	assert.Equal(t, "hi", string(buf[:n]))
}

func TestRendezvousCleanup(t *testing.T) {
	ctx, h, vm := setup(t)
	dom0 := h.Dom0().Store()
	base := "/local/domain/0/data/vchan/1/111"
	srv, err := vchan.Listen(ctx, h.Dom0(), vm.ID(), 111, 4096, 4096)
	require.NoError(t, err)
	perms, err := dom0.GetPerms(ctx, base+"/ring-ref")
	require.NoError(t, err)
	assert.Equal(t, []xenstore.Perm{{Dom: 0, Access: xenstore.AccessNone}, {Dom: 1, Access: xenstore.AccessRead}}, perms)
	_, err = dom0.Read(ctx, base+"/event-channel")
	require.NoError(t, err)

	w, err := dom0.Watch(ctx, "/local/domain/0/data/vchan")
	require.NoError(t, err)
	cli, err := vchan.Dial(ctx, vm, xen.Dom0, 111)
	require.NoError(t, err)
	for {
		_, err := dom0.Read(ctx, "/local/domain/0/data/vchan/1")
		if errors.Is(err, xenstore.ENOENT) {
			break // the entry and its emptied parent are gone
		}
		select {
		case <-w.C():
		case <-ctx.Done():
			t.Fatal("server never removed its xenstore entry")
		}
	}
	require.NoError(t, cli.Close())
	require.NoError(t, srv.Close())
	require.ErrorIs(t, srv.Close(), vchan.ErrClosed)

	// A server closed before any client came removes its entry too, but
	// leaves other ports' entries alone.
	keep, err := vchan.Listen(ctx, h.Dom0(), vm.ID(), 112, 4096, 4096)
	require.NoError(t, err)
	defer keep.Close()
	srv, err = vchan.Listen(ctx, h.Dom0(), vm.ID(), 111, 4096, 4096)
	require.NoError(t, err)
	require.NoError(t, srv.Close())
	_, err = dom0.Read(ctx, base)
	require.ErrorIs(t, err, xenstore.ENOENT)
	_, err = dom0.Read(ctx, "/local/domain/0/data/vchan/1/112/ring-ref")
	require.NoError(t, err)
}

func TestCloseUnblocks(t *testing.T) {
	ctx, h, vm := setup(t)
	srv, cli := pair(t, ctx, h.Dom0(), vm, 111, 1024, 2048)
	defer guard(ctx, srv, cli)()
	readErr, writeErr := make(chan error, 1), make(chan error, 1)
	go func() {
		_, err := cli.Read(make([]byte, 1))
		readErr <- err
	}()
	go func() {
		_, err := cli.Write(make([]byte, 10_000)) // more than the 1024-byte ring
		writeErr <- err
	}()
	// The server reads something, so the writer is surely running.
	_, err := srv.Read(make([]byte, 1))
	require.NoError(t, err)
	require.NoError(t, cli.Close())
	require.ErrorIs(t, <-readErr, vchan.ErrClosed)
	require.ErrorIs(t, <-writeErr, vchan.ErrClosed)
	_, err = cli.Read(make([]byte, 1))
	require.ErrorIs(t, err, vchan.ErrClosed)
	n, err := cli.Read(nil)
	assert.Zero(t, n)
	assert.NoError(t, err, "empty reads never block or fail")
}

func TestDialErrors(t *testing.T) {
	ctx, h, vm := setup(t)
	_, err := vchan.Dial(ctx, vm, vm.ID(), 1)
	require.Error(t, err)
	_, err = vchan.Dial(ctx, h.Dom0(), 42, 1)
	require.ErrorContains(t, err, "does not exist", "dom0 may ask whether the server exists")
	guest, cancelGuest := context.WithTimeout(ctx, 50*time.Millisecond)
	defer cancelGuest()
	_, err = vchan.Dial(guest, vm, 42, 1)
	require.ErrorIs(t, err, context.DeadlineExceeded, "a guest may not ask, and waits")
	_, err = vchan.Dial(ctx, vm, 0, -1)
	require.Error(t, err)

	short, cancel := context.WithTimeout(ctx, 50*time.Millisecond)
	defer cancel()
	_, err = vchan.Dial(short, vm, xen.Dom0, 5)
	require.ErrorIs(t, err, context.DeadlineExceeded, "nobody listens")

	// Half a rendezvous (ring-ref without event-channel) means "not yet".
	dom0 := h.Dom0().Store()
	half := "/local/domain/0/data/vchan/1/6/ring-ref"
	require.NoError(t, dom0.Write(ctx, half, []byte("8")))
	require.NoError(t, dom0.SetPerms(ctx, half, xenstore.Perm{Dom: 0, Access: xenstore.AccessNone}, xenstore.Perm{Dom: 1, Access: xenstore.AccessRead}))
	short2, cancel2 := context.WithTimeout(ctx, 50*time.Millisecond)
	defer cancel2()
	_, err = vchan.Dial(short2, vm, xen.Dom0, 6)
	require.ErrorIs(t, err, context.DeadlineExceeded, "half-published server")

	_, err = vchan.Listen(ctx, vm, vm.ID(), 1, 0, 0)
	require.Error(t, err)
	_, err = vchan.Listen(ctx, vm, 0, 1, vchan.MaxRingSize+1, 0)
	require.Error(t, err)
	_, err = vchan.Listen(ctx, vm, 0, -1, 0, 0)
	require.Error(t, err)
}

// hostileServer publishes a hand-made control page for vm on port.
type hostileServer struct {
	ctrl  []byte
	ev    xen.EventChannel
	share xen.Share
}

func newHostileServer(t *testing.T, ctx context.Context, h *sim.Hypervisor, vm *sim.Domain, port int, lo, ro uint16, ringRef string) *hostileServer {
	t.Helper()
	d := h.Dom0()
	ev, err := d.AllocUnbound(vm.ID())
	require.NoError(t, err)
	s, err := d.Share(vm.ID(), 1, true)
	require.NoError(t, err)
	ctrl := s.Pages()[0]
	binary.LittleEndian.PutUint16(ctrl[16:], lo)
	binary.LittleEndian.PutUint16(ctrl[18:], ro)
	xen.Word(ctrl, 20).Store(2 | 1<<8)
	if ringRef == "" {
		ringRef = strconv.Itoa(int(s.Refs()[0]))
	}
	base := "/local/domain/0/data/vchan/" + strconv.Itoa(int(vm.ID())) + "/" + strconv.Itoa(port)
	for k, v := range map[string]string{"ring-ref": ringRef, "event-channel": strconv.Itoa(int(ev.Port()))} {
		require.NoError(t, d.Store().Write(ctx, base+"/"+k, []byte(v)))
		require.NoError(t, d.Store().SetPerms(ctx, base+"/"+k, xenstore.Perm{Dom: 0, Access: xenstore.AccessNone}, xenstore.Perm{Dom: vm.ID(), Access: xenstore.AccessRead}))
	}
	return &hostileServer{ctrl: ctrl, ev: ev, share: s}
}

func TestDialRejectsHostileServer(t *testing.T) {
	ctx, h, vm := setup(t)
	for i, tc := range []struct {
		lo, ro  uint16
		ringRef string
		want    string
	}{
		{9, 11, "", "orders"},
		{12, 21, "", "orders"},
		{10, 10, "", "same in-page slot"},
		{10, 11, "0", "ring-ref"},
		{10, 11, "abc", "ring-ref"},
		{10, 11, "99999999999", "ring-ref"},
		{12, 12, "", "ring pages"}, // grants[] is all zeroes
	} {
		port := 100 + i
		newHostileServer(t, ctx, h, vm, port, tc.lo, tc.ro, tc.ringRef)
		_, err := vchan.Dial(ctx, vm, xen.Dom0, port)
		require.ErrorContains(t, err, tc.want, "case %d", i)
	}

	// A live flag that is not "waiting" means someone else is connected.
	hs := newHostileServer(t, ctx, h, vm, 200, 10, 11, "")
	xen.Word(hs.ctrl, 20).Store(1 | 1<<8)
	_, err := vchan.Dial(ctx, vm, xen.Dom0, 200)
	require.ErrorContains(t, err, "another client")
}

func TestCorruptIndicesFailCleanly(t *testing.T) {
	ctx, h, vm := setup(t)
	hs := newHostileServer(t, ctx, h, vm, 111, 10, 11, "")
	cli, err := vchan.Dial(ctx, vm, xen.Dom0, 111)
	require.NoError(t, err)
	defer cli.Close()
	defer guard(ctx, cli)()

	// RIGHT (server to client): prod - cons larger than the 2048-byte ring.
	xen.Word(hs.ctrl, 12).Store(5000)
	require.NoError(t, hs.ev.Notify())
	_, err = cli.Read(make([]byte, 10))
	require.ErrorIs(t, err, vchan.ErrCorrupt)
	_, err = cli.Write([]byte("x"))
	require.ErrorIs(t, err, vchan.ErrCorrupt, "the connection stays failed")

	// LEFT (client to server): the server claims to have consumed bytes
	// that were never written.
	hs2 := newHostileServer(t, ctx, h, vm, 112, 10, 11, "")
	cli2, err := vchan.Dial(ctx, vm, xen.Dom0, 112)
	require.NoError(t, err)
	defer cli2.Close()
	defer guard(ctx, cli2)()
	xen.Word(hs2.ctrl, 0).Store(100)
	_, err = cli2.Write([]byte("x"))
	require.ErrorIs(t, err, vchan.ErrCorrupt)

	// The other direction: a client lying about LEFT's producer index.
	ctx2, h2, vm2 := setup(t)
	srv, err := vchan.Listen(ctx2, h2.Dom0(), vm2.ID(), 111, 4096, 4096)
	require.NoError(t, err)
	defer srv.Close()
	ref, err := vm2.Store().Read(ctx2, "/local/domain/0/data/vchan/1/111/ring-ref")
	require.NoError(t, err)
	r, err := strconv.Atoi(string(ref))
	require.NoError(t, err)
	m, err := vm2.Map(xen.Dom0, []xen.GrantRef{xen.GrantRef(r)}, true)
	require.NoError(t, err)
	defer m.Close()
	xen.Word(m.Pages()[0], 4).Store(1 << 31)
	_, err = srv.Read(make([]byte, 10))
	require.ErrorIs(t, err, vchan.ErrCorrupt)
}

// BenchmarkStream measures one direction of a QubesDB-sized vchan (4 KiB
// rings) on the simulator, 1 KiB per Write.
func BenchmarkStream(b *testing.B) {
	h := sim.New()
	defer h.Close()
	vm, err := h.CreateDomain("vm")
	if err != nil {
		b.Fatal(err)
	}
	ctx := context.Background()
	srv, err := vchan.Listen(ctx, h.Dom0(), vm.ID(), 111, 4096, 4096)
	if err != nil {
		b.Fatal(err)
	}
	defer srv.Close()
	cli, err := vchan.Dial(ctx, vm, xen.Dom0, 111)
	if err != nil {
		b.Fatal(err)
	}
	defer cli.Close()
	msg := make([]byte, 1024)
	done := make(chan error, 1)
	go func() {
		buf := make([]byte, 4096)
		want := b.N * len(msg)
		for want > 0 {
			n, err := srv.Read(buf)
			if err != nil {
				done <- err
				return
			}
			want -= n
		}
		done <- nil
	}()
	b.SetBytes(int64(len(msg)))
	b.ReportAllocs()
	b.ResetTimer()
	for range b.N {
		if _, err := cli.Write(msg); err != nil {
			b.Fatal(err)
		}
	}
	if err := <-done; err != nil {
		b.Fatal(err)
	}
}

// TestIndicesWrapAround runs a connection whose free-running indices start
// just below 2^32, as after 4 GiB of traffic: data crosses both the index
// wrap and the ring's end, in each direction.
func TestIndicesWrapAround(t *testing.T) {
	ctx, h, vm := setup(t)
	hs := newHostileServer(t, ctx, h, vm, 111, 10, 11, "") // LEFT 1024 bytes at 1024, RIGHT 2048 at 2048
	const start = 1<<32 - 3
	for off := 0; off < 16; off += 4 {
		xen.Word(hs.ctrl, off).Store(start)
	}
	cli, err := vchan.Dial(ctx, vm, xen.Dom0, 111)
	require.NoError(t, err)
	defer cli.Close()
	defer guard(ctx, cli)()

	// Server to client over RIGHT.
	msg := []byte("across the wrap")
	for i, b := range msg {
		hs.ctrl[2048+(start+i)%2048] = b
	}
	xen.Word(hs.ctrl, 12).Store(start + uint32(len(msg)))
	require.NoError(t, hs.ev.Notify())
	got := make([]byte, 64)
	n, err := io.ReadAtLeast(cli, got, len(msg))
	require.NoError(t, err)
	assert.Equal(t, msg, got[:n])
	assert.Equal(t, uint32(len(msg)-3), xen.Word(hs.ctrl, 8).Load(), "RIGHT cons wrapped")

	// Client to server over LEFT.
	_, err = cli.Write(msg)
	require.NoError(t, err)
	assert.Equal(t, uint32(len(msg)-3), xen.Word(hs.ctrl, 4).Load(), "LEFT prod wrapped")
	for i, b := range msg {
		require.Equal(t, b, hs.ctrl[1024+(start+i)%1024], "byte %d", i)
	}
}
