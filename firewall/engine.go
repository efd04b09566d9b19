// Package firewall is qfw's userspace packet engine: it sits between the
// client qubes' vifs and the uplink to sys-net, filters every new flow
// through the client's Qubes rules and NATs what it lets through, as the
// Linux sys-firewall does.
//
// The data path is a pipeline with one goroutine per Link:
//
//  1. Read a batch of frames from a link (routineReadLink) into buffers that
//     are reused for the engine's lifetime; parse each frame once with
//     gvisor's header views into a reused packet descriptor (packet.parse).
//  2. From a client (fromClient): answer ARP and neighbour solicitations for
//     the gateway, drop what is not unicast IP addressed to us, drop spoofed
//     sources, answer pings to the firewall itself and reject (or ignore)
//     anything else sent to it, send ICMP "time exceeded" and
//     "fragmentation needed" as a router must.
//  3. Established flow (conntrack hit): update the flow's state and
//     translate in place (source NAT, the DNS redirection's destination,
//     TTL, incremental checksums) and queue the frame for the uplink. This
//     is the fast path: no allocation, no rule walk.
//  4. New flow (newFlow): drop unroutable destinations and ICMP other than
//     echo requests. IPv4 DNS (UDP and TCP port 53) to the i-th client DNS
//     address (Config.ClientDNS, by default 10.139.1.1 and .2) is
//     redirected to the i-th IPv4 address of Config.UplinkDNS (modulo their
//     number), as qubes-setup-dnat-to-ns does (the identity, hence nothing,
//     when the two agree, as in Qubes). Client-to-client traffic (after the
//     redirection) is dropped. Then the client's Ruleset decides, on the
//     redirected destination as Linux's forward hook sees it after the
//     prerouting DNAT. Accept creates a conntrack entry with a random NAT
//     port (and the DNS redirection, whose replies and ICMP errors are
//     translated back); Drop answers ICMP admin-prohibited, rate-limited
//     per client. A TCP segment other than a SYN without a flow is
//     answered with a RST.
//  5. From the uplink (fromUplink): ARP and neighbour discovery for our
//     address and the gateway's, pings to us, then only packets of known
//     flows (TTL and MTU checked as in step 2) and ICMP errors that quote
//     one are translated back and queued for the client's link; everything
//     else is dropped.
//  6. At the end of the batch, every queued frame is written with one Write
//     per destination link (flush).
//
// IPv4 fragments are forwarded, never reassembled (fragments.go): a first
// fragment takes steps 2 to 5 like any packet and, once forwarded, starts a
// fragment train (a bounded table with a per-client share, 30 s); a later
// fragment is forwarded in either direction only if its train is known,
// with its addresses translated as its flow's (the DNS redirection's too),
// else dropped, as are later fragments addressed to the firewall itself.
// Fragments that cannot be forwarded safely this way (RFC 1858 tiny and
// overlapping TCP fragments, fragmented ICMP errors, ...) and IPv6
// extension headers (fragment header included) are dropped by
// packet.parse.
//
// Frames the engine makes itself (replies, ICMP errors, resets) are built
// in per-goroutine scratch buffers, so steady-state forwarding does not
// allocate. One mutex (Engine.mu) guards the conntrack and fragment train
// tables, the clients and the counters; a link's goroutine holds it while
// it processes a batch (about a hundred nanoseconds per packet), never
// while it writes.
//
// Files follow the pipeline: engine.go (Run, routineReadLink), worker.go
// (processBatch, flush), packet.go (parse, translate), client.go
// (fromClient ... forwardToUplink), conntrack.go, uplink.go (fromUplink ...
// forwardToClient), fragments.go (fragment trains), icmp.go and
// neighbour.go (frames the engine makes).
package firewall

import (
	"context"
	"crypto/rand"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"net/netip"
	"slices"
	"sync"
	"time"

	"gvisor.dev/gvisor/pkg/tcpip"
	"gvisor.dev/gvisor/pkg/tcpip/header"

	"qfw/rules"
)

// GatewayMAC is the Ethernet address of the firewall's side of every client
// vif, as Linux netback and mirage use it.
var GatewayMAC = net.HardwareAddr{0xfe, 0xff, 0xff, 0xff, 0xff, 0xff}

// Defaults for Config fields left zero.
const (
	DefaultMaxFlows = 10000
	// DefaultClientShareDivisor: by default one client may hold a quarter of
	// the table.
	DefaultClientShareDivisor = 4
)

// Config is the firewall VM's network configuration as QubesDB gives it
// (specs/qubes.md section 4), plus the engine's limits.
type Config struct {
	UplinkIP4      netip.Addr // /qubes-ip: our address towards sys-net
	UplinkIP6      netip.Addr // /qubes-ip6, optional: enables NAT66
	UplinkGateway4 netip.Addr // /qubes-gateway: sys-net, its MAC resolved by ARP
	UplinkGateway6 netip.Addr // /qubes-gateway6, optional
	ClientGateway4 netip.Addr // /qubes-netvm-gateway: what clients route through
	ClientGateway6 netip.Addr // /qubes-netvm-gateway6, optional; else the link-local fe80::fcff:ffff:feff:ffff
	// ClientDNS (Q) are /qubes-netvm-primary-dns and -secondary-dns, the
	// DNS servers clients are told to use; empty means
	// rules.DefaultDNSServers (10.139.1.1, 10.139.1.2).
	ClientDNS []netip.Addr
	// UplinkDNS (U) are this VM's own DNS servers, /qubes-primary-dns and
	// -secondary-dns (what setup-ip writes to a Linux sys-firewall's
	// resolv.conf); only the IPv4 ones count. As qubes-setup-dnat-to-ns,
	// a new IPv4 UDP or TCP flow to ClientDNS[i] port 53 is sent to
	// U[i % len(U)] instead, and its replies come back from ClientDNS[i].
	// In Qubes U == Q (10.139.1.1/.2): the redirection is the identity
	// and sys-net does the real one. Empty: queries go to ClientDNS
	// unchanged (sys-net redirects them).
	//
	// RuleOptions hands Q and U to the rule compiler for
	// specialtarget=dns (the agent's dns-addr set is U, matched after the
	// DNAT; Q covers the unredirected case).
	UplinkDNS []netip.Addr

	MaxFlows          int // conntrack capacity; 0 means DefaultMaxFlows
	MaxFlowsPerClient int // one client's share; 0 means MaxFlows/DefaultClientShareDivisor
	// MaxFragTrains is the capacity of the IPv4 fragment train table
	// (fragments.go); 0 means DefaultMaxFragTrains. A client's share of it
	// is in the proportion of MaxFlowsPerClient to MaxFlows.
	MaxFragTrains int

	Logger *slog.Logger     // nil discards
	Clock  func() time.Time // nil means monotonicClock(); tests move time by hand
	Rand   io.Reader        // seeds the NAT port generator; nil means crypto/rand
}

// ClientDNSServers is Q: ClientDNS, or Qubes' default addresses when it is
// empty. The engine redirects queries to these addresses, and
// specialtarget=dns matches them.
func (cfg *Config) ClientDNSServers() []netip.Addr {
	if len(cfg.ClientDNS) == 0 {
		return rules.DefaultDNSServers
	}
	return cfg.ClientDNS
}

// RuleOptions are the options to compile a client's rule tree of one family
// with: specialtarget=dns matches the client DNS addresses and this VM's own
// DNS servers, the targets of the DNS redirection (see UplinkDNS).
func (cfg *Config) RuleOptions(family rules.Family, resolver rules.Resolver) rules.Options {
	servers := slices.Clone(cfg.ClientDNSServers())
	for _, a := range cfg.UplinkDNS {
		if !slices.Contains(servers, a) {
			servers = append(servers, a)
		}
	}
	return rules.Options{Family: family, DNSServers: servers, Resolver: resolver}
}

// dnsRedirect is one line of qubes-setup-dnat-to-ns: IPv4 UDP and TCP to
// from, port 53, go to to.
type dnsRedirect struct {
	from, to [16]byte // IPv4 in the first four bytes, as in flowKey
}

// dnsRedirects pairs each IPv4 client DNS address Q[i] with U[i % len(U)],
// U being the IPv4 uplink DNS servers, leaving out the pairs where the two
// are equal (nothing to translate) and everything when U is empty.
func (cfg *Config) dnsRedirects() []dnsRedirect {
	var u []netip.Addr
	for _, a := range cfg.UplinkDNS {
		if a = a.Unmap(); a.Is4() {
			u = append(u, a)
		}
	}
	if len(u) == 0 {
		return nil
	}
	var out []dnsRedirect
	for i, q := range cfg.ClientDNSServers() {
		if q = q.Unmap(); !q.Is4() || u[i%len(u)] == q {
			continue
		}
		var r dnsRedirect
		q4, u4 := q.As4(), u[i%len(u)].As4()
		copy(r.from[:], q4[:])
		copy(r.to[:], u4[:])
		out = append(out, r)
	}
	return out
}

// monotonicClock reads the wall clock once and then advances with the
// monotonic clock, so that a clock step (time sync, resume) neither expires
// nor prolongs every flow at once; Linux's conntrack counts jiffies too.
func monotonicClock() func() time.Time {
	start := time.Now()
	return func() time.Time { return start.Add(time.Since(start)) }
}

// ClientConfig describes one client qube attached to the firewall.
type ClientConfig struct {
	Name string
	IP4  netip.Addr       // the client's IPv4 address (required)
	IP6  netip.Addr       // optional
	MAC  net.HardwareAddr // the client's own MAC (frames to it go there)
	Link Link             // its vif; the engine owns and closes it
}

// Engine is the packet engine. Create it with New, attach clients with
// AddClient, give them rules with SetRules and start it with Run.
type Engine struct {
	cfg       Config
	log       *slog.Logger
	now       func() time.Time
	uplink    *port
	uplinkErr chan error // a failure of the uplink ends Run

	// Our addresses as gvisor's header views take them.
	uplinkAddr4, uplinkAddr6 tcpip.Address
	clientGW4, clientGW6     tcpip.Address
	dnsRedirects             []dnsRedirect // Config.dnsRedirects, read-only

	mu              sync.Mutex // guards everything below
	clients         map[netip.Addr]*client
	flows           *conntrack
	frags           *fragTable
	neighbours      [2]neighbour // uplink gateways: [0] IPv4, [1] IPv6
	uplinkCounters  UplinkCounters
	uplinkICMPLimit tokenBucket // ICMP errors we send to the uplink
	uplinkLogLimit  tokenBucket // logs of uplink write failures
	run             *runState   // nil unless Run is active
	ended           bool        // Run has returned
}

// runState is what Run shares with the goroutines it starts.
type runState struct {
	ctx context.Context
	wg  sync.WaitGroup
}

// port is one link with what the data path needs of it at hand.
type port struct {
	link     Link
	mac      tcpip.LinkAddress
	macBytes [header.EthernetAddressSize]byte
	mtu      int
	writeMu  sync.Mutex // serializes Write: several goroutines send to a port
	client   *client    // nil for the uplink
}

func newPort(l Link, c *client) *port {
	return &port{link: l, mac: tcpip.LinkAddress(l.MAC()), macBytes: [header.EthernetAddressSize]byte(l.MAC()), mtu: l.MTU(), client: c}
}

// New makes an engine for the given configuration, forwarding to uplink.
// The engine owns the uplink and closes it when Run ends.
func New(cfg Config, uplink Link) (*Engine, error) {
	if !cfg.UplinkIP4.Is4() || !cfg.UplinkGateway4.Is4() || !cfg.ClientGateway4.Is4() {
		return nil, fmt.Errorf("firewall: uplink address %v, uplink gateway %v and client gateway %v must all be IPv4",
			cfg.UplinkIP4, cfg.UplinkGateway4, cfg.ClientGateway4)
	}
	if cfg.UplinkIP6.IsValid() && (!cfg.UplinkIP6.Is6() || !cfg.UplinkGateway6.Is6()) {
		return nil, fmt.Errorf("firewall: uplink IPv6 %v needs an IPv6 gateway, have %v", cfg.UplinkIP6, cfg.UplinkGateway6)
	}
	if len(uplink.MAC()) != header.EthernetAddressSize {
		return nil, fmt.Errorf("firewall: uplink MAC %v is not an Ethernet address", uplink.MAC())
	}
	if cfg.MaxFlows <= 0 {
		cfg.MaxFlows = DefaultMaxFlows
	}
	if cfg.MaxFlowsPerClient <= 0 || cfg.MaxFlowsPerClient > cfg.MaxFlows {
		cfg.MaxFlowsPerClient = max(1, cfg.MaxFlows/DefaultClientShareDivisor)
	}
	if cfg.MaxFragTrains <= 0 {
		cfg.MaxFragTrains = DefaultMaxFragTrains
	}
	if cfg.Logger == nil {
		cfg.Logger = slog.New(slog.DiscardHandler)
	}
	if cfg.Clock == nil {
		cfg.Clock = monotonicClock()
	}
	if cfg.Rand == nil {
		cfg.Rand = rand.Reader
	}
	var seed [32]byte
	if _, err := io.ReadFull(cfg.Rand, seed[:]); err != nil {
		return nil, fmt.Errorf("firewall: seeding the NAT port generator: %w", err)
	}
	e := &Engine{
		cfg:          cfg,
		log:          cfg.Logger,
		now:          cfg.Clock,
		uplink:       newPort(uplink, nil),
		uplinkAddr4:  tcpipAddr(cfg.UplinkIP4),
		uplinkAddr6:  tcpipAddr(cfg.UplinkIP6),
		clientGW4:    tcpipAddr(cfg.ClientGateway4),
		clientGW6:    tcpipAddr(cfg.ClientGateway6),
		dnsRedirects: cfg.dnsRedirects(),
		uplinkErr:    make(chan error, 1),
		clients:      make(map[netip.Addr]*client),
		flows:        newConntrack(cfg.MaxFlows, cfg.MaxFlowsPerClient, seed),
		frags:        newFragTable(cfg.MaxFragTrains, max(1, cfg.MaxFragTrains*cfg.MaxFlowsPerClient/cfg.MaxFlows)),
	}
	if e.clientGW6.Len() == 0 {
		// Clients still get ICMPv6 errors (and ND answers) from the
		// gateway's link-local address.
		e.clientGW6 = header.LinkLocalAddr(tcpip.LinkAddress(GatewayMAC))
	}
	frameSize := header.EthernetMinimumSize + e.uplink.mtu
	e.neighbours[0] = newNeighbour(tcpipAddr(cfg.UplinkGateway4), frameSize)
	if e.uplinkAddr6.Len() != 0 {
		e.neighbours[1] = newNeighbour(tcpipAddr(cfg.UplinkGateway6), frameSize)
	}
	return e, nil
}

// tcpipAddr converts an address for gvisor's header views; the invalid
// address becomes the empty one.
func tcpipAddr(a netip.Addr) tcpip.Address {
	if !a.IsValid() {
		return tcpip.Address{}
	}
	return tcpip.AddrFromSlice(a.Unmap().AsSlice())
}

// AddClient attaches a client qube. The engine owns cfg.Link from now on,
// unless AddClient fails (also once Run has returned). Its traffic is
// rejected until SetRules gives it rules (fail closed).
func (e *Engine) AddClient(cfg ClientConfig) error {
	if !cfg.IP4.Is4() {
		return fmt.Errorf("firewall: client %q: IPv4 address %v is required", cfg.Name, cfg.IP4)
	}
	if cfg.IP6.IsValid() && !cfg.IP6.Is6() {
		return fmt.Errorf("firewall: client %q: %v is not an IPv6 address", cfg.Name, cfg.IP6)
	}
	if len(cfg.MAC) != header.EthernetAddressSize || cfg.Link == nil || len(cfg.Link.MAC()) != header.EthernetAddressSize {
		return fmt.Errorf("firewall: client %q: needs an Ethernet MAC (have %v) and a link with one", cfg.Name, cfg.MAC)
	}
	c := newClient(cfg)
	c.port = newPort(cfg.Link, c)
	e.mu.Lock()
	defer e.mu.Unlock()
	if e.ended {
		// Nothing would read the link, nor close it.
		return fmt.Errorf("firewall: client %q: the engine has stopped", cfg.Name)
	}
	for _, a := range []netip.Addr{cfg.IP4, cfg.IP6} {
		if a.IsValid() && e.clients[a] != nil {
			return fmt.Errorf("firewall: client %q: address %v already belongs to client %q", cfg.Name, a, e.clients[a].name)
		}
	}
	// Flows that other clients opened to these addresses while they were
	// no client's are cut, so that sys-net cannot answer as the new
	// client (vif-route-qubes purges them from conntrack likewise).
	e.clients[cfg.IP4] = c
	e.flows.removeRemote(cfg.IP4)
	if cfg.IP6.IsValid() {
		e.clients[cfg.IP6] = c
		e.flows.removeRemote(cfg.IP6)
	}
	if e.run != nil {
		e.startWorker(c.port)
	}
	e.log.Info("client added", "client", c.name, "ip", cfg.IP4, "ip6", cfg.IP6)
	return nil
}

// RemoveClient detaches the client that has address ip (either family),
// forgets its flows and closes its link. Removing an unknown client is a
// no-op.
func (e *Engine) RemoveClient(ip netip.Addr) {
	e.mu.Lock()
	c := e.clients[ip]
	e.mu.Unlock()
	if c != nil {
		e.removeClient(c)
	}
}

// removeClient detaches c unless that already happened (a client with the
// same address may have been added since).
func (e *Engine) removeClient(c *client) {
	e.mu.Lock()
	if c.removed {
		e.mu.Unlock()
		return
	}
	delete(e.clients, c.ip4)
	if c.ip6.IsValid() {
		delete(e.clients, c.ip6)
	}
	e.flows.removeClient(c)
	e.frags.removeClient(c)
	c.removed = true
	e.mu.Unlock()
	c.port.link.Close()
	e.log.Info("client removed", "client", c.name, "ip", c.ip4)
}

// SetRules installs a client's rule set for the family of rs (atomically,
// for new flows), then re-checks that client's existing flows of the family:
// a flow the new rules reject is removed from the table, and for an answered
// TCP connection the client is sent a RST (with the sequence number it
// expects next) so that its application sees the cut at once. The remote
// side is not told; its connection times out. Later segments of a cut
// connection are answered with RST too. rs == nil blocks the family again.
// It fails if no client has address clientIP.
func (e *Engine) SetRules(clientIP netip.Addr, rs *rules.Ruleset) error {
	e.mu.Lock()
	c := e.clients[clientIP]
	if c == nil {
		e.mu.Unlock()
		return fmt.Errorf("firewall: rules for %v: no such client", clientIP)
	}
	family := rules.FamilyOf(clientIP)
	if rs != nil {
		family = rs.Family()
	}
	table := newRuleTable(rs)
	c.rules(family).Store(table)
	resets := e.flows.recheck(c, family, table, e.now().UnixNano())
	e.mu.Unlock()
	if rs != nil && rs.Blocked() {
		e.log.Warn("rules failed to parse, blocking the client's traffic", "client", c.name, "family", family, "errors", rs.Errors())
	}
	e.log.Info("rules set", "client", c.name, "family", family, "cut", len(resets))
	if len(resets) > 0 {
		c.port.writeMu.Lock()
		_, err := c.port.link.Write(resets)
		c.port.writeMu.Unlock()
		if err != nil {
			e.log.Warn("sending RST for cut connections failed", "client", c.name, "err", err)
		}
	}
	return nil
}

// Run forwards traffic until ctx is done or the uplink fails, with one
// goroutine reading each link. A client link that fails removes only that
// client. When Run returns, every link has been closed.
func (e *Engine) Run(ctx context.Context) error {
	ctx, cancel := context.WithCancel(ctx)
	defer cancel()
	e.mu.Lock()
	if e.run != nil || e.ended {
		e.mu.Unlock()
		return errors.New("firewall: Run called twice")
	}
	e.run = &runState{ctx: ctx}
	e.startWorker(e.uplink)
	for ip, c := range e.clients {
		if ip == c.ip4 {
			e.startWorker(c.port)
		}
	}
	e.mu.Unlock()

	e.resolveGateways()
	ticker := time.NewTicker(housekeepingPeriod)
	defer ticker.Stop()
	var err error
loop:
	for {
		select {
		case <-ctx.Done():
			break loop
		case err = <-e.uplinkErr:
			break loop
		case <-ticker.C:
			e.housekeeping()
		}
	}
	e.mu.Lock()
	run := e.run
	e.run, e.ended = nil, true
	links := []Link{e.uplink.link}
	for ip, c := range e.clients {
		if ip == c.ip4 {
			links = append(links, c.port.link)
		}
	}
	e.mu.Unlock()
	for _, l := range links {
		l.Close()
	}
	run.wg.Wait()
	return err
}

// housekeepingPeriod is how often Run calls housekeeping.
const housekeepingPeriod = time.Second

// housekeeping runs once per housekeepingPeriod: expire flows and
// fragment trains, retry resolving the uplink gateways.
func (e *Engine) housekeeping() {
	e.mu.Lock()
	now := e.now().UnixNano()
	e.flows.expire(now)
	e.frags.expire(now)
	e.mu.Unlock()
	e.resolveGateways()
}

// uplinkWriteFailed counts a failed write to the uplink and logs it, at
// most once a second.
func (e *Engine) uplinkWriteFailed(frames int, err error) {
	e.mu.Lock()
	e.uplinkCounters.WriteErrors++
	logIt := e.uplinkLogLimit.allow(e.now().UnixNano(), 1, 1)
	e.mu.Unlock()
	if logIt {
		e.log.Warn("writing to the uplink failed", "frames", frames, "err", err)
	}
}

// startWorker starts the goroutine that reads p. Caller holds e.mu.
func (e *Engine) startWorker(p *port) {
	run := e.run
	run.wg.Add(1)
	go func() {
		defer run.wg.Done()
		e.routineReadLink(run.ctx, p)
	}()
}

// routineReadLink is one link's goroutine: read a batch, process every
// frame, flush what the batch produced.
func (e *Engine) routineReadLink(ctx context.Context, p *port) {
	w := newWorker(e, p)
	for {
		n, err := p.link.Read(w.bufs, w.sizes)
		if err != nil {
			if p.client == nil {
				if ctx.Err() == nil {
					e.log.Error("reading the uplink failed", "err", err)
					select {
					case e.uplinkErr <- fmt.Errorf("firewall: reading the uplink: %w", err):
					default:
					}
				}
				return
			}
			if ctx.Err() != nil {
				return // Run is ending and closed the link
			}
			if !errors.Is(err, net.ErrClosed) {
				e.log.Warn("client link failed, removing the client", "client", p.client.name, "err", err)
			}
			e.removeClient(p.client)
			return
		}
		w.processBatch(n)
	}
}
