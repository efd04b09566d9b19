package main

import (
	"errors"
	"fmt"
	"log/slog"
	"net/netip"

	"qfw/firewall"
	"qfw/qubesdb"
)

// engineConfig maps the firewall VM's QubesDB (path -> value) to the
// engine's configuration: package qubesdb reads the keys (specs/qubes.md
// section 4), this only says which goes where. The engine cannot run
// without its uplink address, sys-net's address and the address clients
// route through; any other key that does not parse is logged and left out.
func engineConfig(db map[string]string, log *slog.Logger) (firewall.Config, error) {
	mirror := qubesdb.NewDB(qubesdb.Limits{})
	entries := make([]qubesdb.Entry, 0, len(db))
	for path, value := range db {
		entries = append(entries, qubesdb.Entry{Path: path, Value: value})
	}
	if err := mirror.Replace(entries); err != nil {
		return firewall.Config{}, fmt.Errorf("QubesDB: %w", err)
	}
	qc, parseErr := qubesdb.ReadConfig(mirror)

	var missing []error
	for _, req := range []struct {
		key  string
		addr netip.Addr
	}{
		{qubesdb.KeyIP, qc.Uplink.IP},
		{qubesdb.KeyGateway, qc.Uplink.Gateway},
		{qubesdb.KeyNetVMGateway, qc.NetVM.Gateway},
	} {
		switch v, ok := db[req.key]; {
		case !ok:
			missing = append(missing, fmt.Errorf("QubesDB %s: missing", req.key))
		case !req.addr.IsValid():
			missing = append(missing, fmt.Errorf("QubesDB %s: %q is not an IPv4 address", req.key, v))
		}
	}
	if len(missing) > 0 {
		return firewall.Config{}, errors.Join(missing...)
	}
	if parseErr != nil {
		log.Warn("QubesDB keys that do not parse are ignored", "err", parseErr)
	}
	return firewall.Config{
		UplinkIP4:      qc.Uplink.IP,
		UplinkIP6:      qc.Uplink.IP6,
		UplinkGateway4: qc.Uplink.Gateway,
		UplinkGateway6: qc.Uplink.Gateway6,
		ClientGateway4: qc.NetVM.Gateway,
		ClientGateway6: qc.NetVM.Gateway6,
		ClientDNS:      validAddrs(qc.NetVM.PrimaryDNS, qc.NetVM.SecondaryDNS),
		UplinkDNS:      validAddrs(qc.Uplink.PrimaryDNS, qc.Uplink.SecondaryDNS),
		Logger:         log,
	}, nil
}

// validAddrs keeps the addresses that are set.
func validAddrs(addrs ...netip.Addr) []netip.Addr {
	var out []netip.Addr
	for _, a := range addrs {
		if a.IsValid() {
			out = append(out, a)
		}
	}
	return out
}
