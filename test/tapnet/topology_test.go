// Package tapnet_test runs qfw's engine between real Linux network stacks:
// one network namespace plays sys-net (the "upstream", with servers and DNS),
// one namespace per client qube, and the engine sits between them on TAP
// devices, in-process or as the qfw binary.
package tapnet_test

import (
	"bufio"
	"context"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/netip"
	"os"
	"strings"
	"testing"
	"time"

	"github.com/stretchr/testify/require"
	"github.com/vishvananda/netlink"
	"golang.org/x/sys/unix"

	"qfw/firewall"
	"qfw/test/nstest"
)

// Addresses of the test network, coherent with what dom0 would write.
var (
	fwIP    = netip.MustParseAddr("10.137.0.6") // /qubes-ip and /qubes-netvm-gateway
	upGW    = netip.MustParseAddr("10.137.0.1") // /qubes-gateway: sys-net
	dns1    = netip.MustParseAddr("10.139.1.1")
	dns2    = netip.MustParseAddr("10.139.1.2")
	serverA = netip.MustParseAddr("203.0.113.10")
	serverB = netip.MustParseAddr("203.0.113.20")
	// IPv6, for topologies with IPv6 clients (Qubes' fd09:24ef:4179::/64).
	fwIP6    = netip.MustParseAddr("fd09:24ef:4179::a89:6")
	upGW6    = netip.MustParseAddr("fd09:24ef:4179::a89:1")
	serverA6 = netip.MustParseAddr("2001:db8::10")
	serverB6 = netip.MustParseAddr("2001:db8::20")
	zone     = dnsZone{"a.qfw.test": serverA, "b.qfw.test": serverB}
)

// Ports the upstream servers listen on (every upstream address).
const (
	httpPort = 80
	echoPort = 7 // TCP and UDP
	dnsPort  = 53
)

const uplinkTAP = "up0"

// qubesClientMAC is the MAC of every client qube's eth0.
var qubesClientMAC = net.HardwareAddr{0x00, 0x16, 0x3e, 0x5e, 0x6c, 0x00}

// testTimeout bounds each test; single operations use shorter deadlines.
const testTimeout = 60 * time.Second

// clientDef names a client qube's TAP and addresses (ip6 optional).
type clientDef struct {
	tap      string
	ip4, ip6 netip.Addr
}

var (
	client5 = clientDef{tap: "c5", ip4: netip.MustParseAddr("10.137.0.5")}
	client7 = clientDef{tap: "c7", ip4: netip.MustParseAddr("10.137.0.7")}
)

// clientNS is a client qube: a namespace whose eth0 is the kernel side of
// the client TAP called tap in the firewall's namespace.
type clientNS struct {
	*nstest.NS
	clientDef
}

// topology is the firewall's namespace (where its TAPs are opened), the
// upstream namespace and the clients.
type topology struct {
	fw, up  *nstest.NS
	clients []*clientNS
	ipv6    bool // some client has IPv6: the uplink has it too
	// ownDNS, when set, is the firewall's own DNS servers
	// (/qubes-primary-dns, -secondary-dns) instead of dns1 and dns2.
	ownDNS []netip.Addr
}

// newTopology makes the namespaces and starts the upstream servers. The
// TAPs do not exist yet: the engine (or qfw) opens them in tp.fw, then
// attach moves them to their namespaces.
func newTopology(t *testing.T, clients ...clientDef) *topology {
	t.Helper()
	tp := &topology{fw: nstest.New(t, "fw"), up: nstest.New(t, "up")}
	for _, c := range clients {
		tp.clients = append(tp.clients, &clientNS{NS: nstest.New(t, c.tap), clientDef: c})
		tp.ipv6 = tp.ipv6 || c.ip6.IsValid()
	}
	lo, err := tp.up.Netlink.LinkByName("lo")
	require.NoError(t, err)
	for _, a := range []netip.Addr{serverA, serverB, dns1, dns2, serverA6, serverB6} {
		require.NoError(t, tp.up.Netlink.AddrAdd(lo, &netlink.Addr{IPNet: hostNet(a), Flags: unix.IFA_F_NODAD}))
	}
	tp.startServers(t)
	return tp
}

func hostNet(a netip.Addr) *net.IPNet {
	return &net.IPNet{IP: a.AsSlice(), Mask: net.CIDRMask(a.BitLen(), a.BitLen())}
}

// client finds a client by TAP name.
func (tp *topology) client(tap string) *clientNS {
	for _, c := range tp.clients {
		if c.tap == tap {
			return c
		}
	}
	panic("no client " + tap)
}

// startServers runs, in the upstream namespace: HTTP answering with the
// server address it was reached at, TCP and UDP echo, DNS for zone. UDP
// sockets are bound to one address each so that replies come from the
// address the client asked.
func (tp *topology) startServers(t *testing.T) {
	t.Helper()
	var httpL, echoL net.Listener
	var dnsL []net.Listener
	var echoU, dnsU []net.PacketConn
	listenUDP := func(to *[]net.PacketConn, port int, addrs ...netip.Addr) error {
		for _, a := range addrs {
			c, err := net.ListenPacket("udp", netip.AddrPortFrom(a, uint16(port)).String())
			if err != nil {
				return err
			}
			*to = append(*to, c)
		}
		return nil
	}
	require.NoError(t, tp.up.Do(func() (err error) {
		if httpL, err = net.Listen("tcp", fmt.Sprintf(":%d", httpPort)); err != nil {
			return err
		}
		if echoL, err = net.Listen("tcp", fmt.Sprintf(":%d", echoPort)); err != nil {
			return err
		}
		// DNS on the Qubes resolver addresses only, so that a test can
		// run another resolver on another address (see
		// TestDNSRedirectedToTheFirewallsOwnResolver).
		if dnsL, err = listenDNS(dns1, dns2); err != nil {
			return err
		}
		if err = listenUDP(&echoU, echoPort, serverA, serverB, dns1, serverA6, serverB6); err != nil {
			return err
		}
		return listenUDP(&dnsU, dnsPort, dns1, dns2)
	}))
	srv := &http.Server{
		Handler: http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
			switch {
			case r.URL.Path == "/bulk" && r.Method == http.MethodGet:
				io.Copy(w, bulkBody())
			case r.URL.Path == "/bulk":
				n, _ := io.Copy(io.Discard, r.Body)
				fmt.Fprintf(w, "%d", n)
			default:
				local := r.Context().Value(http.LocalAddrContextKey).(net.Addr)
				fmt.Fprintf(w, "server %s\n", local.(*net.TCPAddr).AddrPort().Addr().Unmap())
			}
		}),
		ReadHeaderTimeout: 10 * time.Second,
	}
	go srv.Serve(httpL)
	go serveTCPEcho(echoL)
	for _, c := range echoU {
		go serveUDPEcho(c)
	}
	zone.serveDNS(dnsU, dnsL)
	t.Cleanup(func() {
		srv.Close()
		for _, c := range append([]net.Listener{echoL}, dnsL...) {
			c.Close()
		}
		for _, c := range append(echoU, dnsU...) {
			c.Close()
		}
	})
}

// listenDNS opens a TCP DNS listener on each address.
func listenDNS(addrs ...netip.Addr) ([]net.Listener, error) {
	var out []net.Listener
	for _, a := range addrs {
		l, err := net.Listen("tcp4", netip.AddrPortFrom(a, dnsPort).String())
		if err != nil {
			for _, o := range out {
				o.Close()
			}
			return nil, err
		}
		out = append(out, l)
	}
	return out, nil
}

// bulkSize is what /bulk sends: enough for many full-size segments, windows
// and batches.
const bulkSize = 8 << 20

// bulkBody is /bulk's content: bulkSize bytes of a repeating pattern.
func bulkBody() io.Reader {
	return io.LimitReader(patternReader{}, bulkSize)
}

type patternReader struct{}

func (patternReader) Read(p []byte) (int, error) {
	for i := range p {
		p[i] = byte(i * 7)
	}
	return len(p), nil
}

// serveTCPEcho echoes lines back until the listener is closed.
func serveTCPEcho(l net.Listener) {
	for {
		c, err := l.Accept()
		if err != nil {
			return
		}
		go func() {
			defer c.Close()
			c.SetDeadline(time.Now().Add(testTimeout))
			r := bufio.NewReader(c)
			for {
				line, err := r.ReadString('\n')
				if err != nil {
					return
				}
				if _, err := c.Write([]byte(line)); err != nil {
					return
				}
			}
		}()
	}
}

// serveUDPEcho echoes datagrams until the socket is closed.
func serveUDPEcho(c net.PacketConn) {
	buf := make([]byte, 2048)
	for {
		n, from, err := c.ReadFrom(buf)
		if err != nil {
			return
		}
		c.WriteTo(buf[:n], from)
	}
}

// attach moves the TAPs, which must exist in tp.fw by now, into their
// namespaces and sets up the kernel side as Qubes does: sys-net routes the
// firewall's /32 over the uplink; a client has its /32, a permanent
// neighbour entry for the gateway and a default route through it. IPv6 is
// set up the same way where a client has it, and turned off elsewhere so
// that its chatter does not reach the engine.
func (tp *topology) attach(t *testing.T) {
	t.Helper()
	require.NoError(t, tp.fw.MoveLink(uplinkTAP, tp.up))
	peers := map[netip.Addr]netip.Addr{upGW: fwIP}
	if tp.ipv6 {
		peers[upGW6] = fwIP6
	}
	configureLink(t, tp.up, uplinkTAP, peers)

	for _, c := range tp.clients {
		require.NoError(t, tp.fw.MoveLink(c.tap, c.NS))
		link, err := c.Netlink.LinkByName(c.tap)
		require.NoError(t, err)
		require.NoError(t, c.Netlink.LinkSetName(link, "eth0"))
		// Qubes gives every client the same MAC, after the firewall has
		// opened the TAP: the TAP link must follow the change.
		require.NoError(t, c.Netlink.LinkSetHardwareAddr(link, qubesClientMAC))
		peers := map[netip.Addr]netip.Addr{c.ip4: fwIP}
		if c.ip6.IsValid() {
			peers[c.ip6] = fwIP6
		}
		configureLink(t, c.NS, "eth0", peers)
		for _, gw := range peers {
			require.NoError(t, c.Netlink.NeighAdd(&netlink.Neigh{
				LinkIndex: link.Attrs().Index, State: netlink.NUD_PERMANENT,
				IP: gw.AsSlice(), HardwareAddr: firewall.GatewayMAC,
			}))
			require.NoError(t, c.Netlink.RouteAdd(&netlink.Route{
				LinkIndex: link.Attrs().Index, Gw: gw.AsSlice(), Flags: int(netlink.FLAG_ONLINK),
			}))
		}
	}
}

// configureLink gives the link each own address (/32, /128) with a host
// route to its peer, and brings it up; IPv6 is turned off on the link when
// it has no IPv6 address.
func configureLink(t *testing.T, ns *nstest.NS, name string, peers map[netip.Addr]netip.Addr) {
	t.Helper()
	link, err := ns.Netlink.LinkByName(name)
	require.NoError(t, err)
	ipv6 := false
	for own := range peers {
		ipv6 = ipv6 || own.Is6()
	}
	if !ipv6 {
		disableIPv6(t, ns, name)
	}
	for own := range peers {
		require.NoError(t, ns.Netlink.AddrAdd(link, &netlink.Addr{IPNet: hostNet(own), Flags: unix.IFA_F_NODAD}))
	}
	require.NoError(t, ns.Netlink.LinkSetUp(link))
	for _, peer := range peers {
		require.NoError(t, ns.Netlink.RouteAdd(&netlink.Route{
			LinkIndex: link.Attrs().Index, Dst: hostNet(peer), Scope: netlink.SCOPE_LINK,
		}))
	}
}

// disableIPv6 keeps an interface from sending IPv6 router and multicast
// chatter, so that the engine's drop counters count only what a test sends.
func disableIPv6(t *testing.T, ns *nstest.NS, iface string) {
	t.Helper()
	require.NoError(t, ns.Do(func() error {
		return os.WriteFile("/proc/sys/net/ipv6/conf/"+iface+"/disable_ipv6", []byte("1"), 0)
	}))
}

// qubesDB is the firewall VM's own QubesDB as dom0 writes it, without rules.
func (tp *topology) qubesDB() map[string]string {
	var connected, connected6 []string
	for _, c := range tp.clients {
		connected = append(connected, c.ip4.String())
		if c.ip6.IsValid() {
			connected6 = append(connected6, c.ip6.String())
		}
	}
	db := map[string]string{
		"/name":                      "sys-firewall",
		"/qubes-ip":                  fwIP.String(),
		"/qubes-netmask":             "255.255.255.255",
		"/qubes-gateway":             upGW.String(),
		"/qubes-primary-dns":         dns1.String(),
		"/qubes-secondary-dns":       dns2.String(),
		"/qubes-mac":                 "00:16:3e:5e:6c:00",
		"/qubes-netvm-gateway":       fwIP.String(),
		"/qubes-netvm-network":       fwIP.String(),
		"/qubes-netvm-netmask":       "255.255.255.255",
		"/qubes-netvm-primary-dns":   dns1.String(),
		"/qubes-netvm-secondary-dns": dns2.String(),
		"/connected-ips":             strings.Join(connected, " "),
		"/connected-ips6":            strings.Join(connected6, " "),
	}
	if tp.ownDNS != nil {
		delete(db, "/qubes-primary-dns")
		delete(db, "/qubes-secondary-dns")
		for i, a := range tp.ownDNS {
			db[[]string{"/qubes-primary-dns", "/qubes-secondary-dns"}[i]] = a.String()
		}
	}
	if tp.ipv6 {
		db["/qubes-ip6"] = fwIP6.String()
		db["/qubes-gateway6"] = upGW6.String()
		db["/qubes-netvm-gateway6"] = fwIP6.String()
	}
	return db
}

// engineConfig is the engine's configuration for the addresses qubesDB
// writes (the tests that run the qfw binary go through the QubesDB file).
func (tp *topology) engineConfig() firewall.Config {
	cfg := firewall.Config{
		UplinkIP4: fwIP, UplinkGateway4: upGW, ClientGateway4: fwIP,
		ClientDNS: []netip.Addr{dns1, dns2}, UplinkDNS: []netip.Addr{dns1, dns2},
	}
	if tp.ownDNS != nil {
		cfg.UplinkDNS = tp.ownDNS
	}
	if tp.ipv6 {
		cfg.UplinkIP6, cfg.UplinkGateway6, cfg.ClientGateway6 = fwIP6, upGW6, fwIP6
	}
	return cfg
}

// ruleTree is a client's rule tree as dom0 writes it: numbered rules,
// policy drop; with the commit key.
func ruleTree(db map[string]string, ip netip.Addr, rules ...string) {
	dir := "/qubes-firewall/" + ip.String()
	for k := range db {
		if strings.HasPrefix(k, dir+"/") {
			delete(db, k)
		}
	}
	db[dir+"/policy"] = "drop"
	for i, r := range rules {
		db[fmt.Sprintf("%s/%04d", dir, i)] = r
	}
	db[dir] = ""
}

// dial connects from inside the client's namespace; the connection may be
// used from any goroutine.
func (c *clientNS) dial(ctx context.Context, network string, to netip.AddrPort) (conn net.Conn, err error) {
	err = c.Do(func() error {
		var d net.Dialer
		conn, err = d.DialContext(ctx, network, to.String())
		return err
	})
	return conn, err
}

// httpGet fetches http://addr/ from the client's namespace.
func (c *clientNS) httpGet(ctx context.Context, addr netip.Addr) (string, error) {
	client := &http.Client{Transport: &http.Transport{
		DialContext: func(ctx context.Context, network, _ string) (net.Conn, error) {
			return c.dial(ctx, "tcp", netip.AddrPortFrom(addr, httpPort))
		},
		DisableKeepAlives: true,
	}}
	req, err := http.NewRequestWithContext(ctx, http.MethodGet, "http://"+netip.AddrPortFrom(addr, httpPort).String()+"/", nil)
	if err != nil {
		return "", err
	}
	resp, err := client.Do(req)
	if err != nil {
		return "", err
	}
	defer resp.Body.Close()
	body, err := io.ReadAll(io.LimitReader(resp.Body, 1000))
	return string(body), err
}

// udpExchange sends payload from the client to a UDP server and returns the
// first datagram that comes back before ctx ends.
func (c *clientNS) udpExchange(ctx context.Context, to netip.AddrPort, payload []byte) ([]byte, error) {
	conn, err := c.dial(ctx, "udp", to)
	if err != nil {
		return nil, err
	}
	defer conn.Close()
	if deadline, ok := ctx.Deadline(); ok {
		conn.SetDeadline(deadline)
	}
	if _, err := conn.Write(payload); err != nil {
		return nil, err
	}
	buf := make([]byte, 2048)
	n, err := conn.Read(buf)
	return buf[:n], err
}
