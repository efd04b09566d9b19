package firewall

import (
	"bytes"
	"fmt"
	"net/netip"
	"sync/atomic"
	"testing"
	"time"

	"github.com/stretchr/testify/require"
	"gvisor.dev/gvisor/pkg/tcpip/header"

	"qfw/rules"
)

// Addresses of the test network: sys-net at .5, the firewall at .6 (its
// uplink address is also the gateway its clients use, as in Qubes).
var (
	sysnetIP  = addr("10.137.0.5")
	uplinkIP  = addr("10.137.0.6")
	sysnetIP6 = addr("fd09:24ef:4179::a89:5")
	uplinkIP6 = addr("fd09:24ef:4179::a89:6")
	clientAIP = addr("10.137.0.10")
	clientA6  = addr("fd09:24ef:4179::a89:a")
	clientBIP = addr("10.137.0.11")
	remoteIP  = addr("93.184.216.34")
	remoteIP6 = addr("2001:db8::1")
	dnsIP     = addr("10.139.1.1")
)

// bed is an engine driven batch by batch from the test goroutine: frames
// go in through the workers' buffers, and what the engine writes is
// drained from the far ends of the in-memory links.
type bed struct {
	t       testing.TB
	e       *Engine
	now     atomic.Int64
	sysnet  *MemLink // sys-net's end of the uplink
	uplink  *worker
	clients map[netip.Addr]*bedClient
}

type bedClient struct {
	peer *MemLink // the client qube's end of its vif
	w    *worker
}

func testConfig() Config {
	return Config{
		UplinkIP4: uplinkIP, UplinkGateway4: sysnetIP, ClientGateway4: uplinkIP,
		UplinkIP6: uplinkIP6, UplinkGateway6: sysnetIP6, ClientGateway6: uplinkIP6,
		ClientDNS: rules.DefaultDNSServers,
		MaxFlows:  1000, MaxFlowsPerClient: 100,
		Rand: bytes.NewReader(make([]byte, 32)),
	}
}

// newBedUnresolved makes a test bed whose clock starts at 0 and whose
// uplink gateway has not announced itself yet (its MAC is unknown).
func newBedUnresolved(t testing.TB, cfg Config) *bed {
	b := &bed{t: t, clients: map[netip.Addr]*bedClient{}}
	cfg.Clock = func() time.Time { return time.Unix(0, b.now.Load()) }
	engineEnd, sysnet := Pipe(uplinkMAC, sysnetMAC, DefaultMTU)
	e, err := New(cfg, engineEnd)
	require.NoError(t, err)
	b.e, b.sysnet, b.uplink = e, sysnet, newWorker(e, e.uplink)
	return b
}

func newBed(t testing.TB, cfg Config) *bed {
	b := newBedUnresolved(t, cfg)
	b.now.Store(time.Date(2026, 11, 27, 12, 0, 0, 0, time.UTC).UnixNano())
	// sys-net announces itself, so the gateway's MAC is known.
	b.fromUplink(arpFrame(header.ARPReply, uplinkMAC, sysnetMAC, sysnetIP, uplinkIP))
	if cfg.UplinkIP6.IsValid() {
		b.fromUplink(ndpFrame(header.ICMPv6NeighborAdvert, sysnetMAC, sysnetIP6, uplinkIP6, sysnetIP6, sysnetMAC))
	}
	return b
}

// addClient attaches a client; rules are lines of rule text accepted by
// both families' trees ("" for none: the client stays blocked).
func (b *bed) addClient(name string, ip4, ip6 netip.Addr, ruleLines ...string) {
	engineEnd, peer := Pipe(GatewayMAC, clientMAC, DefaultMTU)
	require.NoError(b.t, b.e.AddClient(ClientConfig{Name: name, IP4: ip4, IP6: ip6, MAC: clientMAC, Link: engineEnd}))
	c := b.e.clients[ip4]
	b.clients[ip4] = &bedClient{peer: peer, w: newWorker(b.e, c.port)}
	if len(ruleLines) > 0 {
		b.setRules(ip4, ruleLines...)
		if ip6.IsValid() {
			b.setRules(ip6, ruleLines...)
		}
	}
}

// setRules gives a client address the rules, numbered from 0000, policy drop.
func (b *bed) setRules(ip netip.Addr, ruleLines ...string) {
	entries := map[string]string{"policy": "drop"}
	for i, r := range ruleLines {
		entries[fmt.Sprintf("%04d", i)] = r
	}
	rs := rules.ParseQubesDB(entries, b.e.cfg.RuleOptions(rules.FamilyOf(ip), nil))
	require.False(b.t, rs.Blocked(), "rules %v: %v", ruleLines, rs.Errors())
	require.NoError(b.t, b.e.SetRules(ip, rs))
}

func (b *bed) advance(d time.Duration) { b.now.Add(int64(d)) }

func process(w *worker, frames [][]byte) {
	for i, f := range frames {
		w.sizes[i] = copy(w.bufs[i], f)
	}
	w.processBatch(len(frames))
}

func (b *bed) fromUplink(frames ...[]byte) { process(b.uplink, frames) }

func (b *bed) fromClient(ip netip.Addr, frames ...[]byte) { process(b.clients[ip].w, frames) }

// drain returns every frame written to the engine's end of l's pipe.
func drain(l *MemLink) [][]byte {
	var out [][]byte
	for {
		select {
		case f := <-l.rx:
			out = append(out, f)
		default:
			return out
		}
	}
}

func (b *bed) toUplink() [][]byte { return drain(b.sysnet) }

func (b *bed) toClient(ip netip.Addr) [][]byte { return drain(b.clients[ip].peer) }

// one requires exactly one frame and decodes it.
func one(t testing.TB, frames [][]byte) decoded {
	t.Helper()
	require.Len(t, frames, 1)
	return decode(t, frames[0])
}

// clientTCP is a TCP segment from client ip to the remote's port 443.
func clientTCP(ip netip.Addr, sport uint16, flags header.TCPFlags, seq, ack uint32, payload string) []byte {
	remote := remoteIP
	if ip.Is6() {
		remote = remoteIP6
	}
	return ipPacket{srcMAC: clientMAC, dstMAC: GatewayMAC, src: ip, dst: remote, df: true, proto: protoTCP,
		sport: sport, dport: 443, flags: flags, seq: seq, ack: ack, payload: []byte(payload)}.frame()
}

// remoteTCP is a TCP segment from the remote's port 443 to our NAT port.
func remoteTCP(natIP netip.Addr, natPort uint16, flags header.TCPFlags, seq, ack uint32, payload string) []byte {
	remote := remoteIP
	if natIP.Is6() {
		remote = remoteIP6
	}
	return ipPacket{srcMAC: sysnetMAC, dstMAC: uplinkMAC, src: remote, dst: natIP, df: true, proto: protoTCP,
		sport: 443, dport: natPort, flags: flags, seq: seq, ack: ack, payload: []byte(payload)}.frame()
}
