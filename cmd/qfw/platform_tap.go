package main

import (
	"context"
	"fmt"
	"log/slog"
	"net"
	"os"
	"time"

	"qfw/firewall"
	"qfw/firewall/tap"
)

// defaultQubesMAC is what dom0 gives every VM when /qubes-mac is absent.
var defaultQubesMAC = net.HardwareAddr{0x00, 0x16, 0x3e, 0x5e, 0x6c, 0x00}

// runTap runs the engine between TAP devices: -uplink towards sys-net, one
// -client per client qube. The kernel side of each client TAP is the client
// qube's interface, so its MAC is the client's.
func runTap(ctx context.Context, opts *options, hup <-chan os.Signal, log *slog.Logger) error {
	db, err := readQubesDBFile(opts.qubesdb)
	if err != nil {
		return err
	}
	cfg, err := engineConfig(db, log)
	if err != nil {
		return fmt.Errorf("QubesDB file %s: %w", opts.qubesdb, err)
	}
	uplinkMAC := defaultQubesMAC
	if v, ok := db["/qubes-mac"]; ok {
		if uplinkMAC, err = net.ParseMAC(v); err != nil || len(uplinkMAC) != 6 {
			return fmt.Errorf("QubesDB file %s: /qubes-mac %q is not an Ethernet address", opts.qubesdb, v)
		}
	}

	engine, err := openTapEngine(cfg, opts, uplinkMAC)
	if err != nil {
		return err
	}
	resolver, err := attachResolver(engine, cfg.UplinkDNS)
	if err != nil {
		return err
	}
	// own_dns (/qubes-primary-dns, -secondary-dns) is also cfg.UplinkDNS:
	// where the engine redirects client DNS to when it differs from
	// client_dns (qubes-setup-dnat-to-ns).
	log.Info("qfw starting", "platform", "tap", "uplink", opts.uplink, "ip", cfg.UplinkIP4,
		"gateway", cfg.UplinkGateway4, "client_gateway", cfg.ClientGateway4, "client_dns", cfg.ClientDNSServers(),
		"own_dns", resolver.servers, "clients", opts.clients.String())
	done := make(chan error, 1)
	go func() { done <- engine.Run(ctx) }()
	log.Info("qfw running", "qubesdb", opts.qubesdb)
	// Rules load once the engine runs: dsthost lookups go through it.
	loader := &ruleLoader{engine: engine, options: cfg.RuleOptions, resolver: resolver, clients: opts.clients, log: log}
	loader.apply(db, true)

	rejects := &rejectReporter{log: log}
	ticker := time.NewTicker(rejectReportPeriod)
	defer ticker.Stop()
	for {
		select {
		case <-ticker.C:
			rejects.report(engine.Counters())
		case err := <-done:
			rejects.report(engine.Counters()) // what the last period saw
			if err != nil {
				return err
			}
			log.Info("qfw stopped")
			return nil
		case <-hup:
			log.Info("SIGHUP: re-reading QubesDB file", "qubesdb", opts.qubesdb)
			db, err := readQubesDBFile(opts.qubesdb)
			if err != nil {
				log.Error("reload failed, rules unchanged", "err", oneLine(err))
				continue
			}
			loader.apply(db, false)
		}
	}
}

// openTapEngine opens the TAPs and attaches them to a new engine. On failure
// it closes whatever it opened.
func openTapEngine(cfg firewall.Config, opts *options, uplinkMAC net.HardwareAddr) (*firewall.Engine, error) {
	uplink, err := tap.Open(opts.uplink, uplinkMAC)
	if err != nil {
		return nil, fmt.Errorf("uplink: %w", err)
	}
	opened := []*tap.Device{uplink}
	fail := func(err error) (*firewall.Engine, error) {
		for _, d := range opened {
			d.Close()
		}
		return nil, err
	}
	engine, err := firewall.New(cfg, uplink)
	if err != nil {
		return fail(err)
	}
	for _, c := range opts.clients {
		dev, err := tap.Open(c.tap, firewall.GatewayMAC)
		if err != nil {
			return fail(fmt.Errorf("client: %w", err))
		}
		opened = append(opened, dev)
		err = engine.AddClient(firewall.ClientConfig{
			Name: c.tap, IP4: c.ip4, IP6: c.ip6, MAC: dev.KernelMAC(), Link: dev,
		})
		if err != nil {
			return fail(err)
		}
	}
	return engine, nil
}
