package tapnet_test

import (
	"bytes"
	"context"
	"crypto/sha256"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"net/http"
	"net/netip"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"
	"unsafe"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
	"github.com/vishvananda/netlink"
	"golang.org/x/sys/unix"

	"qfw/firewall"
	"qfw/firewall/tap"
	"qfw/rules"
)

// engineRun is an in-process engine between the topology's TAPs.
type engineRun struct {
	*firewall.Engine
	cfg firewall.Config
}

// syncBuffer collects the engine's log; it is shown when a test fails.
type syncBuffer struct {
	mu  sync.Mutex
	buf bytes.Buffer
}

func (b *syncBuffer) Write(p []byte) (int, error) {
	b.mu.Lock()
	defer b.mu.Unlock()
	return b.buf.Write(p)
}

func (b *syncBuffer) String() string {
	b.mu.Lock()
	defer b.mu.Unlock()
	return b.buf.String()
}

// startEngine opens the TAPs in the firewall namespace, attaches the
// clients (no rules yet: blocked), moves the TAPs into place and runs the
// engine until the test ends.
func startEngine(t *testing.T, tp *topology) *engineRun {
	t.Helper()
	cfg := tp.engineConfig()
	logs := &syncBuffer{}
	cfg.Logger = slog.New(slog.NewTextHandler(logs, &slog.HandlerOptions{Level: slog.LevelDebug}))
	t.Cleanup(func() {
		if t.Failed() {
			t.Logf("engine log:\n%s", logs)
		}
	})

	devs := map[string]*tap.Device{}
	require.NoError(t, tp.fw.Do(func() error {
		names := []string{uplinkTAP}
		mac := map[string]net.HardwareAddr{uplinkTAP: {0x00, 0x16, 0x3e, 0x5e, 0x6c, 0x00}}
		for _, c := range tp.clients {
			names = append(names, c.tap)
			mac[c.tap] = firewall.GatewayMAC
		}
		for _, name := range names {
			d, err := tap.Open(name, mac[name])
			if err != nil {
				return err
			}
			devs[name] = d
		}
		return nil
	}))
	engine, err := firewall.New(cfg, devs[uplinkTAP])
	require.NoError(t, err)
	for _, c := range tp.clients {
		d := devs[c.tap]
		require.NoError(t, engine.AddClient(firewall.ClientConfig{Name: c.tap, IP4: c.ip4, IP6: c.ip6, MAC: d.KernelMAC(), Link: d}))
	}
	tp.attach(t)

	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- engine.Run(ctx) }()
	t.Cleanup(func() {
		cancel()
		select {
		case err := <-done:
			assert.NoError(t, err, "engine.Run")
		case <-time.After(10 * time.Second):
			t.Error("engine.Run did not return after its context ended")
		}
	})
	return &engineRun{Engine: engine, cfg: cfg}
}

// setRules gives a client IPv4 rules as dom0 writes them (policy drop).
func (e *engineRun) setRules(t *testing.T, c *clientNS, ruleLines ...string) {
	t.Helper()
	e.setRulesFor(t, c.ip4, ruleLines...)
}

// setRulesFor gives the rule tree of one client address (IPv4 or IPv6).
func (e *engineRun) setRulesFor(t *testing.T, ip netip.Addr, ruleLines ...string) {
	t.Helper()
	db := map[string]string{}
	ruleTree(db, ip, ruleLines...)
	entries := map[string]string{}
	prefix := "/qubes-firewall/" + ip.String() + "/"
	for k, v := range db {
		if rel, ok := strings.CutPrefix(k, prefix); ok {
			entries[rel] = v
		}
	}
	rs := rules.ParseQubesDB(entries, e.cfg.RuleOptions(rules.FamilyOf(ip), nil))
	require.False(t, rs.Blocked(), "rules do not parse: %v", rs.Errors())
	require.NoError(t, e.SetRules(ip, rs))
}

// clientCounters is the engine's counters of one client.
func (e *engineRun) clientCounters(t *testing.T, c *clientNS) firewall.ClientCounters {
	t.Helper()
	for _, cc := range e.Counters().Clients {
		if cc.IP4 == c.ip4 {
			return cc
		}
	}
	t.Fatalf("no counters for client %s", c.tap)
	return firewall.ClientCounters{}
}

func testContext(t *testing.T) context.Context {
	ctx, cancel := context.WithTimeout(context.Background(), testTimeout)
	t.Cleanup(cancel)
	return ctx
}

// assertRejected checks that err is the ICMP admin-prohibited answer
// (EHOSTUNREACH), not a timeout: the firewall rejects, it does not drop.
func assertRejected(t *testing.T, err error, what string) {
	t.Helper()
	require.Error(t, err, "%s must be rejected", what)
	assert.True(t, errors.Is(err, syscall.EHOSTUNREACH), "%s: want EHOSTUNREACH (ICMP admin-prohibited), got %v", what, err)
}

// assertReset checks that a connection was cut by a reset (ECONNRESET on a
// write, end of stream on a read), not left to time out.
func assertReset(t *testing.T, err error) {
	t.Helper()
	assert.True(t, errors.Is(err, syscall.ECONNRESET) || errors.Is(err, syscall.EPIPE) || errors.Is(err, io.EOF),
		"want the connection reset, got %v", err)
}

func TestTCPAllowedAndRejectedFast(t *testing.T) {
	tp := newTopology(t, client5)
	e := startEngine(t, tp)
	c5 := tp.client("c5")
	e.setRules(t, c5, "action=accept proto=tcp dst4="+serverA.String()+"/32 dstports=80-80")
	ctx := testContext(t)

	body, err := c5.httpGet(ctx, serverA)
	require.NoError(t, err)
	assert.Equal(t, "server 203.0.113.10\n", body)

	// Rejected: the client's connect fails on the ICMP error. The deadline
	// only bounds the test; a drop would run into it and fail the assertion.
	dialCtx, cancel := context.WithTimeout(ctx, 20*time.Second)
	defer cancel()
	_, err = c5.dial(dialCtx, "tcp4", netip.AddrPortFrom(serverB, httpPort))
	assertRejected(t, err, "TCP to serverB")
	_, err = c5.dial(dialCtx, "tcp4", netip.AddrPortFrom(serverA, echoPort))
	assertRejected(t, err, "TCP to another port of serverA")
	assert.NoError(t, dialCtx.Err(), "rejections must not wait for a timeout")

	cc := e.clientCounters(t, c5)
	assert.GreaterOrEqual(t, cc.Accepted, uint64(1))
	assert.GreaterOrEqual(t, cc.Rejected, uint64(2))
}

func TestUDPAllowedAndRejected(t *testing.T) {
	tp := newTopology(t, client5)
	e := startEngine(t, tp)
	c5 := tp.client("c5")
	e.setRules(t, c5, "action=accept proto=udp dst4="+serverA.String()+"/32 dstports=7-7")
	ctx := testContext(t)

	reply, err := c5.udpExchange(ctx, netip.AddrPortFrom(serverA, echoPort), []byte("ping over udp"))
	require.NoError(t, err)
	assert.Equal(t, "ping over udp", string(reply))

	exCtx, cancel := context.WithTimeout(ctx, 20*time.Second)
	defer cancel()
	_, err = c5.udpExchange(exCtx, netip.AddrPortFrom(serverB, echoPort), []byte("forbidden"))
	assertRejected(t, err, "UDP to serverB")
}

func TestPing(t *testing.T) {
	tp := newTopology(t, client5)
	e := startEngine(t, tp)
	c5 := tp.client("c5")
	e.setRules(t, c5, "action=accept proto=icmp dst4="+serverA.String()+"/32")
	ctx := testContext(t)

	out, err := c5.Command(ctx, "ping", "-n", "-c", "1", "-W", "10", serverA.String()).CombinedOutput()
	require.NoError(t, err, "ping serverA: %s", out)
	assert.Contains(t, string(out), "1 received")

	out, err = c5.Command(ctx, "ping", "-n", "-c", "1", "-W", "10", serverB.String()).CombinedOutput()
	require.Error(t, err, "ping serverB must fail: %s", out)
	assert.Contains(t, string(out), "From "+fwIP.String())
	assert.Contains(t, string(out), "Packet filtered", "ping must see ICMP admin-prohibited")

	out, err = c5.Command(ctx, "ping", "-n", "-c", "1", "-W", "10", fwIP.String()).CombinedOutput()
	require.NoError(t, err, "the gateway answers pings: %s", out)
}

// icmpError is what IP_RECVERR reports for an ICMP error about a datagram.
type icmpError struct {
	Type, Code uint8
	From       netip.Addr
}

// probeTTL sends one UDP datagram with the given TTL from the client and
// returns the ICMP error that comes back, as traceroute does.
func (c *clientNS) probeTTL(ctx context.Context, t *testing.T, to netip.AddrPort, ttl int) icmpError {
	t.Helper()
	conn, err := c.dial(ctx, "udp4", to)
	require.NoError(t, err)
	defer conn.Close()
	raw, err := conn.(*net.UDPConn).SyscallConn()
	require.NoError(t, err)
	var sockErr error
	require.NoError(t, raw.Control(func(fd uintptr) {
		sockErr = unix.SetsockoptInt(int(fd), unix.IPPROTO_IP, unix.IP_TTL, ttl)
		if sockErr == nil {
			sockErr = unix.SetsockoptInt(int(fd), unix.IPPROTO_IP, unix.IP_RECVERR, 1)
		}
	}))
	require.NoError(t, sockErr)
	_, err = conn.Write([]byte("probe"))
	require.NoError(t, err)

	deadline, _ := ctx.Deadline()
	require.NoError(t, conn.SetReadDeadline(deadline))
	var got icmpError
	buf, oob := make([]byte, 512), make([]byte, 512)
	// The error queue wakes the poller as a read event (EPOLLERR).
	err = raw.Read(func(fd uintptr) bool {
		_, oobn, _, _, err := unix.Recvmsg(int(fd), buf, oob, unix.MSG_ERRQUEUE)
		if err == unix.EAGAIN {
			return false
		}
		if sockErr = err; err != nil {
			return true
		}
		msgs, err := unix.ParseSocketControlMessage(oob[:oobn])
		if sockErr = err; err != nil {
			return true
		}
		for _, m := range msgs {
			if m.Header.Level != unix.IPPROTO_IP || m.Header.Type != unix.IP_RECVERR {
				continue
			}
			// struct sock_extended_err, then the offender's sockaddr_in.
			const offender = int(unsafe.Sizeof(unix.SockExtendedErr{}))
			if len(m.Data) < offender+unix.SizeofSockaddrInet4 || m.Data[4] != unix.SO_EE_ORIGIN_ICMP {
				continue
			}
			got.Type, got.Code = m.Data[5], m.Data[6]
			got.From = netip.AddrFrom4([4]byte(m.Data[offender+4 : offender+8]))
		}
		return true
	})
	require.NoError(t, err, "no ICMP error for the TTL %d probe", ttl)
	require.NoError(t, sockErr)
	return got
}

func TestTracerouteTTLExpiry(t *testing.T) {
	tp := newTopology(t, client5)
	e := startEngine(t, tp)
	c5 := tp.client("c5")
	e.setRules(t, c5, "action=accept")
	ctx := testContext(t)

	got := c5.probeTTL(ctx, t, netip.AddrPortFrom(serverA, 33434), 1)
	assert.Equal(t, icmpError{Type: 11, Code: 0, From: fwIP}, got, "TTL 1 expires at the firewall")

	// TTL 2 reaches serverA, where no one listens on that port.
	got = c5.probeTTL(ctx, t, netip.AddrPortFrom(serverA, 33434), 2)
	assert.Equal(t, icmpError{Type: 3, Code: 3, From: serverA}, got, "TTL 2 reaches the server: port unreachable")
}

func TestDNSToQubesResolvers(t *testing.T) {
	tp := newTopology(t, client5)
	e := startEngine(t, tp)
	c5 := tp.client("c5")
	e.setRules(t, c5, "action=accept specialtarget=dns")
	ctx := testContext(t)

	assert.Equal(t, serverA, c5.lookupUDP(ctx, t, dns1, 0x1234, "a.qfw.test"))

	// Over TCP to the secondary server.
	conn, err := c5.dial(ctx, "tcp4", netip.AddrPortFrom(dns2, dnsPort))
	require.NoError(t, err)
	defer conn.Close()
	assert.Equal(t, serverB, lookupTCP(ctx, t, conn, 0x4321, "b.qfw.test"))

	// specialtarget=dns is port 53 of the DNS servers only.
	exCtx, cancel := context.WithTimeout(ctx, 20*time.Second)
	defer cancel()
	_, err = c5.udpExchange(exCtx, netip.AddrPortFrom(serverA, echoPort), []byte("not dns"))
	assertRejected(t, err, "UDP to serverA")
	_, err = c5.udpExchange(exCtx, netip.AddrPortFrom(dns1, echoPort), []byte("not port 53"))
	assertRejected(t, err, "UDP to the DNS server's port 7")
}

// TestDNSRedirectedToTheFirewallsOwnResolver: when the firewall's own DNS
// server (/qubes-primary-dns) is not 10.139.1.1, client queries to
// 10.139.1.1 and .2 go to it, as qubes-setup-dnat-to-ns redirects them in a
// Linux sys-firewall, and the answers come back from the address asked.
func TestDNSRedirectedToTheFirewallsOwnResolver(t *testing.T) {
	ownResolver := netip.MustParseAddr("192.0.2.53")
	ownZone := dnsZone{"a.qfw.test": netip.MustParseAddr("198.51.100.10"), "b.qfw.test": netip.MustParseAddr("198.51.100.20")}
	tp := newTopology(t, client5)
	// Upstream, nothing answers at 10.139.1.1 and .2 any more: the only
	// resolver listens on ownResolver, with answers of its own.
	lo, err := tp.up.Netlink.LinkByName("lo")
	require.NoError(t, err)
	require.NoError(t, tp.up.Netlink.AddrAdd(lo, &netlink.Addr{IPNet: hostNet(ownResolver), Flags: unix.IFA_F_NODAD}))
	for _, a := range []netip.Addr{dns1, dns2} {
		require.NoError(t, tp.up.Netlink.AddrDel(lo, &netlink.Addr{IPNet: hostNet(a)}))
	}
	var udp net.PacketConn
	var tcp []net.Listener
	require.NoError(t, tp.up.Do(func() (err error) {
		if udp, err = net.ListenPacket("udp4", netip.AddrPortFrom(ownResolver, dnsPort).String()); err != nil {
			return err
		}
		tcp, err = listenDNS(ownResolver)
		return err
	}))
	ownZone.serveDNS([]net.PacketConn{udp}, tcp)
	t.Cleanup(func() {
		udp.Close()
		tcp[0].Close()
	})
	tp.ownDNS = []netip.Addr{ownResolver}
	e := startEngine(t, tp)
	require.Equal(t, []netip.Addr{ownResolver}, e.cfg.UplinkDNS)
	c5 := tp.client("c5")
	e.setRules(t, c5, "action=accept specialtarget=dns")
	ctx := testContext(t)

	assert.Equal(t, ownZone["a.qfw.test"], c5.lookupUDP(ctx, t, dns1, 0x1234, "a.qfw.test"), "answered by the firewall's own resolver")

	// Over TCP to the secondary address: U[1 % len(U)] is ownResolver too.
	conn, err := c5.dial(ctx, "tcp4", netip.AddrPortFrom(dns2, dnsPort))
	require.NoError(t, err)
	defer conn.Close()
	assert.Equal(t, netip.AddrPortFrom(dns2, dnsPort), conn.RemoteAddr().(*net.TCPAddr).AddrPort(), "the client talks to the address it asked")
	assert.Equal(t, ownZone["b.qfw.test"], lookupTCP(ctx, t, conn, 0x4321, "b.qfw.test"))

	// The resolver's own address is specialtarget=dns too.
	assert.Equal(t, ownZone["a.qfw.test"], c5.lookupUDP(ctx, t, ownResolver, 0x5678, "a.qfw.test"))
}

// recorder is a UDP socket that keeps what it receives.
type recorder struct {
	got chan string
}

// listenRecorder opens a recorder on port 9 inside ns.
func listenRecorder(t *testing.T, do func(func() error) error) *recorder {
	t.Helper()
	var conn net.PacketConn
	require.NoError(t, do(func() (err error) {
		conn, err = net.ListenPacket("udp4", ":9")
		return err
	}))
	t.Cleanup(func() { conn.Close() })
	r := &recorder{got: make(chan string, 16)}
	go func() {
		buf := make([]byte, 100)
		for {
			n, _, err := conn.ReadFrom(buf)
			if err != nil {
				return
			}
			select {
			case r.got <- string(buf[:n]):
			default:
			}
		}
	}()
	return r
}

// sendUDP sends one datagram from the client, from a chosen source address.
func (c *clientNS) sendUDP(t *testing.T, from netip.Addr, to netip.AddrPort, payload string) {
	t.Helper()
	require.NoError(t, c.Do(func() error {
		conn, err := net.DialUDP("udp4", net.UDPAddrFromAddrPort(netip.AddrPortFrom(from, 0)), net.UDPAddrFromAddrPort(to))
		if err != nil {
			return err
		}
		defer conn.Close()
		_, err = conn.Write([]byte(payload))
		return err
	}))
}

func TestAntiSpoofing(t *testing.T) {
	tp := newTopology(t, client5)
	e := startEngine(t, tp)
	c5 := tp.client("c5")
	e.setRules(t, c5, "action=accept")
	ctx := testContext(t)
	upstream := listenRecorder(t, tp.up.Do)

	// The client claims another qube's address on its own interface.
	spoofed := netip.MustParseAddr("10.137.0.99")
	link, err := c5.Netlink.LinkByName("eth0")
	require.NoError(t, err)
	require.NoError(t, c5.Netlink.AddrAdd(link, &netlink.Addr{IPNet: hostNet(spoofed)}))
	before := e.clientCounters(t, c5).Dropped

	c5.sendUDP(t, spoofed, netip.AddrPortFrom(serverA, 9), "spoofed")
	c5.sendUDP(t, c5.ip4, netip.AddrPortFrom(serverA, 9), "genuine")
	// One link is processed in order: once the genuine datagram arrived,
	// the spoofed one, sent first, has been decided.
	select {
	case got := <-upstream.got:
		assert.Equal(t, "genuine", got, "a datagram with a spoofed source crossed the firewall")
	case <-ctx.Done():
		t.Fatal("the genuine datagram never arrived upstream")
	}
	assert.Greater(t, e.clientCounters(t, c5).Dropped, before, "the spoofed frame is counted as dropped")
}

func TestClientToClientBlocked(t *testing.T) {
	tp := newTopology(t, client5, client7)
	e := startEngine(t, tp)
	c5, c7 := tp.client("c5"), tp.client("c7")
	e.setRules(t, c5, "action=accept")
	e.setRules(t, c7, "action=accept")
	ctx := testContext(t)
	atC7 := listenRecorder(t, c7.Do)
	upstream := listenRecorder(t, tp.up.Do)

	c5.sendUDP(t, c5.ip4, netip.AddrPortFrom(c7.ip4, 9), "to c7")
	c5.sendUDP(t, c5.ip4, netip.AddrPortFrom(serverA, 9), "to upstream")
	select {
	case got := <-upstream.got:
		assert.Equal(t, "to upstream", got)
	case <-ctx.Done():
		t.Fatal("the datagram to upstream never arrived")
	}
	// The engine decided the datagram to c7 before the later one to upstream;
	// had it forwarded it, c7's kernel would hold it by now.
	select {
	case got := <-atC7.got:
		t.Fatalf("client c7 received %q from client c5", got)
	default:
	}

	// TCP from c7 to a listening c5 is dropped silently, as Linux does
	// (forward "oifgroup 2 drop"): only a deadline can show a drop.
	var l net.Listener
	require.NoError(t, c5.Do(func() (err error) {
		l, err = net.Listen("tcp4", ":8080")
		return err
	}))
	defer l.Close()
	dialCtx, cancel := context.WithTimeout(ctx, 3*time.Second)
	defer cancel()
	_, err := c7.dial(dialCtx, "tcp4", netip.AddrPortFrom(c5.ip4, 8080))
	require.Error(t, err, "client c7 connected to client c5")
	var netErr net.Error
	assert.True(t, errors.As(err, &netErr) && netErr.Timeout(), "client-to-client is dropped without an answer, got %v", err)
}

func TestRuleEditCutsOpenConnection(t *testing.T) {
	tp := newTopology(t, client5)
	e := startEngine(t, tp)
	c5 := tp.client("c5")
	e.setRules(t, c5, "action=accept proto=tcp dst4="+serverA.String()+"/32")
	ctx := testContext(t)

	conn, err := c5.dial(ctx, "tcp4", netip.AddrPortFrom(serverA, echoPort))
	require.NoError(t, err)
	defer conn.Close()
	deadline, _ := ctx.Deadline()
	conn.SetDeadline(deadline)
	echo := func(line string) error {
		if _, err := conn.Write([]byte(line + "\n")); err != nil {
			return err
		}
		buf := make([]byte, len(line)+1)
		if _, err := io.ReadFull(conn, buf); err != nil {
			return err
		}
		if string(buf) != line+"\n" {
			return errors.New("echo returned " + string(buf))
		}
		return nil
	}
	require.NoError(t, echo("before"))

	// A rule edit that still allows the flow keeps it.
	e.setRules(t, c5, "action=accept proto=tcp dst4="+serverA.String()+"/32 dstports=7-7")
	require.NoError(t, echo("still allowed"))

	// Now forbidden: the connection is cut at once.
	e.setRules(t, c5, "action=accept proto=tcp dst4="+serverB.String()+"/32")
	err = echo("after")
	require.Error(t, err, "the connection survived rules that forbid it")
	assertReset(t, err)
}

func TestTwoClientsDifferentRules(t *testing.T) {
	tp := newTopology(t, client5, client7)
	e := startEngine(t, tp)
	c5, c7 := tp.client("c5"), tp.client("c7")
	e.setRules(t, c5, "action=accept proto=tcp dst4="+serverA.String()+"/32")
	e.setRules(t, c7, "action=accept proto=tcp dst4="+serverB.String()+"/32")
	ctx := testContext(t)

	type outcome struct {
		client *clientNS
		server netip.Addr
		allow  bool
	}
	cases := []outcome{{c5, serverA, true}, {c5, serverB, false}, {c7, serverB, true}, {c7, serverA, false}}
	results := make([]error, len(cases))
	bodies := make([]string, len(cases))
	var wg sync.WaitGroup
	for i, oc := range cases {
		wg.Go(func() {
			bodies[i], results[i] = oc.client.httpGet(ctx, oc.server)
		})
	}
	wg.Wait()
	for i, oc := range cases {
		what := oc.client.tap + " -> " + oc.server.String()
		if oc.allow {
			require.NoError(t, results[i], what)
			assert.Equal(t, "server "+oc.server.String()+"\n", bodies[i], what)
		} else {
			assertRejected(t, results[i], what)
		}
	}
}

func TestIPv6RulesPerFamily(t *testing.T) {
	dual := client5
	dual.ip6 = netip.MustParseAddr("fd09:24ef:4179::a89:5")
	tp := newTopology(t, dual)
	e := startEngine(t, tp)
	c5 := tp.client("c5")
	// dom0 writes one tree per family; each decides only its own family.
	e.setRules(t, c5, "action=accept proto=tcp dst4="+serverA.String()+"/32")
	e.setRulesFor(t, c5.ip6, "action=accept proto=tcp dst6="+serverB6.String()+"/128", "action=accept proto=icmp")
	ctx := testContext(t)

	body, err := c5.httpGet(ctx, serverB6)
	require.NoError(t, err)
	assert.Equal(t, "server 2001:db8::20\n", body)
	body, err = c5.httpGet(ctx, serverA)
	require.NoError(t, err)
	assert.Equal(t, "server 203.0.113.10\n", body)

	dialCtx, cancel := context.WithTimeout(ctx, 20*time.Second)
	defer cancel()
	_, err = c5.dial(dialCtx, "tcp6", netip.AddrPortFrom(serverA6, httpPort))
	require.Error(t, err, "TCP to serverA6 must be rejected")
	// ICMPv6 administratively prohibited reads as EACCES in Linux.
	assert.True(t, errors.Is(err, syscall.EACCES), "want ICMPv6 admin-prohibited (EACCES), got %v", err)
	assert.NoError(t, dialCtx.Err())

	out, err := c5.Command(ctx, "ping", "-n", "-c", "1", "-W", "10", serverA6.String()).CombinedOutput()
	require.NoError(t, err, "ping6 serverA6: %s", out)
}

func TestInboundFromUpstreamDropped(t *testing.T) {
	tp := newTopology(t, client5)
	e := startEngine(t, tp)
	c5 := tp.client("c5")
	e.setRules(t, c5, "action=accept")
	ctx := testContext(t)
	// The path works outbound.
	_, err := c5.httpGet(ctx, serverA)
	require.NoError(t, err)

	var l net.Listener
	require.NoError(t, c5.Do(func() (err error) {
		l, err = net.Listen("tcp4", ":8080")
		return err
	}))
	defer l.Close()
	// A hostile sys-net routes the client's address to the firewall.
	link, err := tp.up.Netlink.LinkByName(uplinkTAP)
	require.NoError(t, err)
	require.NoError(t, tp.up.Netlink.RouteAdd(&netlink.Route{
		LinkIndex: link.Attrs().Index, Dst: hostNet(c5.ip4), Gw: fwIP.AsSlice(),
	}))
	dialCtx, cancel := context.WithTimeout(ctx, 3*time.Second)
	defer cancel()
	var conn net.Conn
	err = tp.up.Do(func() (err error) {
		var d net.Dialer
		conn, err = d.DialContext(dialCtx, "tcp4", netip.AddrPortFrom(c5.ip4, 8080).String())
		return err
	})
	if err == nil {
		conn.Close()
	}
	require.Error(t, err, "a connection from upstream reached the client")
	var netErr net.Error
	assert.True(t, errors.As(err, &netErr) && netErr.Timeout(), "unsolicited inbound is dropped without an answer, got %v", err)
	assert.Greater(t, e.Counters().Uplink.Dropped, uint64(0))
}

func TestBulkTransferBothWays(t *testing.T) {
	tp := newTopology(t, client5)
	e := startEngine(t, tp)
	c5 := tp.client("c5")
	e.setRules(t, c5, "action=accept proto=tcp dst4="+serverA.String()+"/32 dstports=80-80")
	ctx := testContext(t)
	client := &http.Client{Transport: &http.Transport{
		DialContext: func(ctx context.Context, _, _ string) (net.Conn, error) {
			return c5.dial(ctx, "tcp4", netip.AddrPortFrom(serverA, httpPort))
		},
	}}
	url := "http://" + serverA.String() + "/bulk"

	req, err := http.NewRequestWithContext(ctx, http.MethodGet, url, nil)
	require.NoError(t, err)
	resp, err := client.Do(req)
	require.NoError(t, err)
	want := sha256.New()
	io.Copy(want, bulkBody())
	got := sha256.New()
	n, err := io.Copy(got, resp.Body)
	resp.Body.Close()
	require.NoError(t, err)
	assert.Equal(t, int64(bulkSize), n)
	assert.Equal(t, want.Sum(nil), got.Sum(nil), "download corrupted")

	req, err = http.NewRequestWithContext(ctx, http.MethodPost, url, bulkBody())
	require.NoError(t, err)
	resp, err = client.Do(req)
	require.NoError(t, err)
	body, err := io.ReadAll(resp.Body)
	resp.Body.Close()
	require.NoError(t, err)
	assert.Equal(t, fmt.Sprint(bulkSize), string(body), "upload")

	cc := e.clientCounters(t, c5)
	assert.Greater(t, cc.RxBytes, uint64(bulkSize))
	assert.Greater(t, cc.TxBytes, uint64(bulkSize))
}
