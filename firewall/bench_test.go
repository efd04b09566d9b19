package firewall

import (
	"fmt"
	"net"
	"testing"

	"github.com/stretchr/testify/require"
	"gvisor.dev/gvisor/pkg/tcpip/header"

	"qfw/rules"
)

// countingLink is a Link that only counts what is written to it (and keeps
// the last frame), so that benchmarks measure the engine, not a pipe.
type countingLink struct {
	mac     net.HardwareAddr
	written int
	last    []byte
}

func newCountingLink(mac net.HardwareAddr) *countingLink {
	return &countingLink{mac: mac, last: make([]byte, 0, 2048)}
}

func (l *countingLink) Read([][]byte, []int) (int, error) { return 0, net.ErrClosed }
func (l *countingLink) Write(bufs [][]byte) (int, error) {
	l.written += len(bufs)
	if len(bufs) > 0 {
		l.last = append(l.last[:0], bufs[len(bufs)-1]...)
	}
	return len(bufs), nil
}
func (l *countingLink) BatchSize() int        { return DefaultBatchSize }
func (l *countingLink) MTU() int              { return DefaultMTU }
func (l *countingLink) MAC() net.HardwareAddr { return l.mac }
func (l *countingLink) Close() error          { return nil }

// fastPath is an engine with one established TCP connection, and one data
// segment of it in each direction.
type fastPath struct {
	e                  *Engine
	uplink, client     *countingLink
	uplinkW, clientW   *worker
	toRemote, toClient []byte
}

func newFastPath(tb testing.TB, ruleLines []string) *fastPath {
	cfg := testConfig()
	cfg.MaxFlows, cfg.MaxFlowsPerClient = 1<<16, 1<<16
	fp := &fastPath{uplink: newCountingLink(uplinkMAC), client: newCountingLink(GatewayMAC)}
	e, err := New(cfg, fp.uplink)
	require.NoError(tb, err)
	require.NoError(tb, e.AddClient(ClientConfig{Name: "a", IP4: clientAIP, MAC: clientMAC, Link: fp.client}))
	entries := map[string]string{"policy": "drop"}
	for i, r := range ruleLines {
		entries[fmt.Sprintf("%04d", i)] = r
	}
	rs := rules.ParseQubesDB(entries, cfg.RuleOptions(rules.IPv4, nil))
	require.False(tb, rs.Blocked(), "%v", rs.Errors())
	require.NoError(tb, e.SetRules(clientAIP, rs))
	fp.e, fp.uplinkW, fp.clientW = e, newWorker(e, e.uplink), newWorker(e, e.clients[clientAIP].port)

	process(fp.uplinkW, [][]byte{arpFrame(header.ARPReply, uplinkMAC, sysnetMAC, sysnetIP, uplinkIP)})
	process(fp.clientW, [][]byte{clientTCP(clientAIP, 40000, header.TCPFlagSyn, 100, 0, "")})
	nat := decode(tb, fp.uplink.last).srcPort
	process(fp.uplinkW, [][]byte{remoteTCP(uplinkIP, nat, header.TCPFlagSyn|header.TCPFlagAck, 5000, 101, "")})
	process(fp.clientW, [][]byte{clientTCP(clientAIP, 40000, header.TCPFlagAck, 101, 5001, "")})
	payload := string(make([]byte, 1400))
	fp.toRemote = clientTCP(clientAIP, 40000, header.TCPFlagAck|header.TCPFlagPsh, 101, 5001, payload)
	fp.toClient = remoteTCP(uplinkIP, nat, header.TCPFlagAck|header.TCPFlagPsh, 5001, 101, payload)
	require.Equal(tb, 2, fp.uplink.written) // SYN, ACK
	require.Equal(tb, 1, fp.client.written) // SYN-ACK
	return fp
}

// forward runs n copies of frame through w in batches, as a link read
// would deliver them. The whole frame is copied into every buffer once;
// per packet only the headers the engine rewrites are restored, so that the
// measure is the engine's work, not the link's copy of the payload.
func forward(w *worker, frame []byte, n int) {
	for i := range w.bufs {
		w.sizes[i] = copy(w.bufs[i], frame)
	}
	headers := frame[:min(len(frame), header.EthernetMinimumSize+header.IPv6MinimumSize+header.TCPMinimumSize)]
	for n > 0 {
		batch := min(n, len(w.bufs))
		for i := range batch {
			copy(w.bufs[i], headers)
		}
		w.processBatch(batch)
		n -= batch
	}
}

func TestFastPathDoesNotAllocate(t *testing.T) {
	fp := newFastPath(t, []string{"action=accept"})
	for _, dir := range []struct {
		name  string
		w     *worker
		frame []byte
		out   *countingLink
	}{
		{"client to uplink", fp.clientW, fp.toRemote, fp.uplink},
		{"uplink to client", fp.uplinkW, fp.toClient, fp.client},
	} {
		before := dir.out.written
		allocs := testing.AllocsPerRun(100, func() { forward(dir.w, dir.frame, DefaultBatchSize) })
		require.Zero(t, allocs, dir.name)
		require.Equal(t, before+101*DefaultBatchSize, dir.out.written, "%s: every packet forwarded", dir.name)
		decode(t, dir.out.last)
	}
}

// BenchmarkFastPath is the established-flow cost per packet (ns/op is per
// packet, processed in batches of DefaultBatchSize, 1400-byte payloads).
func BenchmarkFastPath(b *testing.B) {
	fp := newFastPath(b, []string{"action=accept"})
	b.Run("tcp-established-client-to-uplink", func(b *testing.B) {
		b.ReportAllocs()
		forward(fp.clientW, fp.toRemote, b.N)
	})
	b.Run("tcp-established-uplink-to-client", func(b *testing.B) {
		b.ReportAllocs()
		forward(fp.uplinkW, fp.toClient, b.N)
	})
}

// BenchmarkNewFlow is the cost of a TCP SYN that creates a flow after
// walking 100 rules (the accepting rule is the last one).
func BenchmarkNewFlow(b *testing.B) {
	var ruleLines []string
	for i := range 99 {
		ruleLines = append(ruleLines, fmt.Sprintf("action=drop proto=tcp dst4=198.51.100.%d/32 dstports=%d-%d", i, 1000+i, 1000+i))
	}
	ruleLines = append(ruleLines, "action=accept proto=tcp dstports=443-443")
	fp := newFastPath(b, ruleLines)
	const ports = 20000 // distinct flows to one remote endpoint before the table is cleared
	syns := make([][]byte, ports)
	for i := range syns {
		syns[i] = clientTCP(clientAIP, uint16(10000+i), header.TCPFlagSyn, 1, 0, "")
	}
	c := fp.e.clients[clientAIP]
	b.ReportAllocs()
	b.ResetTimer()
	for i := 0; i < b.N; {
		batch := min(b.N-i, len(fp.clientW.bufs))
		for j := range batch {
			fp.clientW.sizes[j] = copy(fp.clientW.bufs[j], syns[(i+j)%ports])
		}
		fp.clientW.processBatch(batch)
		i += batch
		if c.flowList.count >= ports-len(fp.clientW.bufs) {
			b.StopTimer()
			fp.e.flows.removeClient(c)
			b.StartTimer()
		}
	}
	b.StopTimer()
	require.Equal(b, uint64(b.N)+1, c.counters.Accepted)
}

// fragmentTrains are n UDP datagrams of client a, each as a first and a
// later fragment with its own IP ID, more than a client's share of the
// fragment train table, so that forwarding them churns the table.
func fragmentTrains(fp *fastPath, n int) [][]byte {
	datagram := ipPacket{srcMAC: clientMAC, dstMAC: GatewayMAC, src: clientAIP, dst: remoteIP, proto: protoUDP, sport: 5000, dport: 9999, payload: make([]byte, 2000)}.frame()
	var frames [][]byte
	for id := range n {
		frames = append(frames, fragmentFrame(datagram, uint16(id), 1480)...)
	}
	return frames
}

// forwardFrames runs frames through w in batches.
func forwardFrames(w *worker, frames [][]byte) {
	for len(frames) > 0 {
		batch := min(len(frames), len(w.bufs))
		for i := range batch {
			w.sizes[i] = copy(w.bufs[i], frames[i])
		}
		w.processBatch(batch)
		frames = frames[batch:]
	}
}

func TestFragmentForwardingDoesNotAllocate(t *testing.T) {
	fp := newFastPath(t, []string{"action=accept"})
	frames := fragmentTrains(fp, 3*DefaultMaxFragTrains)
	forwardFrames(fp.clientW, frames) // creates the flow, fills the client's share
	before := fp.uplink.written
	allocs := testing.AllocsPerRun(10, func() { forwardFrames(fp.clientW, frames) })
	require.Zero(t, allocs)
	require.Equal(t, before+11*len(frames), fp.uplink.written, "every fragment forwarded")
	require.LessOrEqual(t, fp.e.Counters().FragTrains, DefaultMaxFragTrains)
}

// BenchmarkFragments is the cost per fragment of forwarding trains of two
// fragments, each train new (ns/op is per fragment).
func BenchmarkFragments(b *testing.B) {
	fp := newFastPath(b, []string{"action=accept"})
	frames := fragmentTrains(fp, 3*DefaultMaxFragTrains)
	forwardFrames(fp.clientW, frames)
	b.ReportAllocs()
	b.ResetTimer()
	for i := 0; i < b.N; {
		n := min(b.N-i, len(frames))
		forwardFrames(fp.clientW, frames[:n])
		i += n
	}
}
