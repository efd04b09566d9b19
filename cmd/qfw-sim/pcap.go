package main

import (
	"bufio"
	"bytes"
	"cmp"
	"errors"
	"fmt"
	"io"
	"maps"
	"net/netip"
	"os"
	"slices"

	"github.com/google/gopacket"
	"github.com/google/gopacket/layers"
	"github.com/google/gopacket/pcapgo"
	"gvisor.dev/gvisor/pkg/tcpip/header"

	"qfw/rules"
)

// maxSummaryFlows bounds the distinct flows remembered for the summary table.
const maxSummaryFlows = 1 << 20

// qubesClientRanges are where dom0 puts client addresses (AppVMs, DispVMs,
// IPv6 clients); used when neither -client nor a dump says who the client is.
var qubesClientRanges = []netip.Prefix{
	netip.MustParsePrefix("10.137.0.0/16"),
	netip.MustParsePrefix("10.138.0.0/16"),
	netip.MustParsePrefix("fd09:24ef:4179::/64"),
}

type packetSource interface {
	ReadPacketData() ([]byte, gopacket.CaptureInfo, error)
	LinkType() layers.LinkType
}

// openCapture opens a pcap or pcapng file, telling them apart by magic.
func openCapture(name string) (packetSource, io.Closer, error) {
	f, err := os.Open(name)
	if err != nil {
		return nil, nil, fmt.Errorf("cannot read %s: %v", name, unwrapPathError(err))
	}
	br := bufio.NewReader(f)
	magic, _ := br.Peek(4)
	var src packetSource
	if bytes.Equal(magic, []byte{0x0a, 0x0d, 0x0d, 0x0a}) {
		src, err = pcapgo.NewNgReader(br, pcapgo.DefaultNgReaderOptions)
	} else {
		src, err = pcapgo.NewReader(br)
	}
	if err != nil {
		f.Close()
		return nil, nil, fmt.Errorf("%s: not a pcap or pcapng file (%v)", name, err)
	}
	return src, f, nil
}

type summaryKey struct {
	number int // -1: policy
	action rules.Action
}

type summaryRow struct {
	text           string
	flows, packets int
}

func (s *simulator) pcap(args []string) error {
	if len(args) != 2 {
		return usageError{"pcap needs RULES and a capture: qfw-sim pcap RULES FILE.pcap"}
	}
	src, err := s.load(args[0])
	if err != nil {
		return err
	}
	s.warnBlocked(src)
	isClient, who, err := s.clientFilter(src)
	if err != nil {
		return err
	}
	capture, closer, err := openCapture(args[1])
	if err != nil {
		return err
	}
	defer closer.Close()

	rows := map[summaryKey]*summaryRow{}
	seen := map[rules.Flow]bool{}
	var st pcapStats
	for {
		data, _, err := capture.ReadPacketData()
		if errors.Is(err, io.EOF) {
			break
		}
		if err != nil {
			return fmt.Errorf("%s: packet %d: %v", args[1], st.Packets+1, err)
		}
		st.Packets++
		f, status := flowOf(capture.LinkType(), data)
		switch status {
		case pktNotIP:
			st.NotIP++
			continue
		case pktMalformed:
			st.Malformed++
			continue
		case pktFragment:
			st.Fragments++
			continue
		}
		if !isClient(f.Src) {
			st.NotClient++
			continue
		}
		v := src.Check(f)
		key := summaryKey{v.Number, v.Action}
		row := rows[key]
		if row == nil {
			row = &summaryRow{text: ruleLabel(v)}
			rows[key] = row
		}
		row.packets++
		if !seen[f] && len(seen) < maxSummaryFlows {
			seen[f] = true
			row.flows++
		}
		if s.opts.json {
			j := toJSON(f.String(), v)
			if err := s.emitJSON(struct {
				Packet int `json:"packet"`
				verdictJSON
			}{st.Packets, j}); err != nil {
				return err
			}
			continue
		}
		fmt.Fprintf(s.out, "#%-6d %-6s  %s  [%s]\n", st.Packets, v.Action, f, ruleLabel(v))
	}
	return s.printSummary(rows, who, st)
}

// pcapStats counts what a capture held.
type pcapStats struct {
	Packets   int `json:"packets"`
	NotClient int `json:"not_from_client"`
	NotIP     int `json:"not_ip"`
	Malformed int `json:"malformed"`
	Fragments int `json:"fragments"`
}

func (s *simulator) printSummary(rows map[summaryKey]*summaryRow, who string, st pcapStats) error {
	keys := slices.Collect(maps.Keys(rows))
	// Rules in order, the policy (number -1) last.
	slices.SortFunc(keys, func(a, b summaryKey) int {
		an, bn := uint(a.number), uint(b.number) // -1 sorts last
		if an != bn {
			return cmp.Compare(an, bn)
		}
		return cmp.Compare(a.action, b.action)
	})
	if s.opts.json {
		type row struct {
			Rule    *int   `json:"rule"`
			Verdict string `json:"verdict"`
			Text    string `json:"text"`
			Flows   int    `json:"flows"`
			Packets int    `json:"packets"`
		}
		sum := struct {
			pcapStats
			Rows []row `json:"rows"`
		}{pcapStats: st}
		for _, k := range keys {
			r := row{Verdict: k.action.String(), Text: rows[k].text, Flows: rows[k].flows, Packets: rows[k].packets}
			if k.number >= 0 {
				num := k.number
				r.Rule = &num
			}
			sum.Rows = append(sum.Rows, r)
		}
		return s.emitJSON(struct {
			Summary any `json:"summary"`
		}{sum})
	}
	fmt.Fprintf(s.out, "\nSummary (outgoing packets of %s):\n", who)
	fmt.Fprintf(s.out, "%-8s %7s %8s  %s\n", "verdict", "flows", "packets", "deciding rule")
	for _, k := range keys {
		r := rows[k]
		fmt.Fprintf(s.out, "%-8s %7d %8d  %s\n", k.action, r.flows, r.packets, r.text)
	}
	fmt.Fprintf(s.out, "%d packets read; not from the client: %d, not IP: %d, malformed: %d, non-first fragments: %d\n",
		st.Packets, st.NotClient, st.NotIP, st.Malformed, st.Fragments)
	return nil
}

// clientFilter says which source addresses are the client's.
func (s *simulator) clientFilter(src *ruleSource) (func(netip.Addr) bool, string, error) {
	if s.opts.client != "" {
		a, err := netip.ParseAddr(s.opts.client)
		if err != nil {
			return nil, "", usageError{fmt.Sprintf("-client: %q is not an address", s.opts.client)}
		}
		return func(x netip.Addr) bool { return x == a }, a.String(), nil
	}
	if src.clients != nil {
		return func(x netip.Addr) bool { return src.clients[x] != nil }, "the dump's clients", nil
	}
	return func(x netip.Addr) bool {
		for _, p := range qubesClientRanges {
			if p.Contains(x) {
				return true
			}
		}
		return false
	}, "Qubes client addresses (10.137.0.0/16, 10.138.0.0/16, fd09:24ef:4179::/64; set -client)", nil
}

type packetStatus int

const (
	pktOK packetStatus = iota
	pktNotIP
	pktMalformed
	pktFragment
)

// flowOf reads the flow of one captured packet.
func flowOf(link layers.LinkType, data []byte) (rules.Flow, packetStatus) {
	var ethType uint16
	switch link {
	case layers.LinkTypeEthernet:
		if len(data) < header.EthernetMinimumSize {
			return rules.Flow{}, pktMalformed
		}
		eth := header.Ethernet(data)
		ethType, data = uint16(eth.Type()), data[header.EthernetMinimumSize:]
		if ethType == 0x8100 && len(data) >= 4 { // one 802.1Q tag
			ethType, data = uint16(data[2])<<8|uint16(data[3]), data[4:]
		}
	case layers.LinkTypeLinuxSLL:
		if len(data) < 16 {
			return rules.Flow{}, pktMalformed
		}
		ethType, data = uint16(data[14])<<8|uint16(data[15]), data[16:]
	case layers.LinkTypeRaw, layers.LinkTypeIPv4, layers.LinkTypeIPv6, 12: // 12: LINKTYPE_RAW on some systems
		if len(data) == 0 {
			return rules.Flow{}, pktMalformed
		}
		switch data[0] >> 4 {
		case 4:
			ethType = uint16(header.IPv4ProtocolNumber)
		case 6:
			ethType = uint16(header.IPv6ProtocolNumber)
		}
	default:
		return rules.Flow{}, pktNotIP
	}
	switch ethType {
	case uint16(header.IPv4ProtocolNumber):
		return ipv4Flow(data)
	case uint16(header.IPv6ProtocolNumber):
		return ipv6Flow(data)
	}
	return rules.Flow{}, pktNotIP
}

func ipv4Flow(data []byte) (rules.Flow, packetStatus) {
	if len(data) < header.IPv4MinimumSize {
		return rules.Flow{}, pktMalformed
	}
	ip := header.IPv4(data)
	hl := int(ip.HeaderLength())
	if header.IPVersion(data) != header.IPv4Version || hl < header.IPv4MinimumSize || hl > len(data) {
		return rules.Flow{}, pktMalformed
	}
	if ip.FragmentOffset() != 0 {
		return rules.Flow{}, pktFragment
	}
	f := rules.Flow{
		Proto: uint8(ip.Protocol()),
		Src:   netip.AddrFrom4(ip.SourceAddress().As4()),
		Dst:   netip.AddrFrom4(ip.DestinationAddress().As4()),
	}
	return transport(f, data[hl:])
}

func ipv6Flow(data []byte) (rules.Flow, packetStatus) {
	if len(data) < header.IPv6MinimumSize {
		return rules.Flow{}, pktMalformed
	}
	ip := header.IPv6(data)
	if header.IPVersion(data) != header.IPv6Version {
		return rules.Flow{}, pktMalformed
	}
	f := rules.Flow{
		Src: netip.AddrFrom16(ip.SourceAddress().As16()),
		Dst: netip.AddrFrom16(ip.DestinationAddress().As16()),
	}
	next, payload := ip.NextHeader(), data[header.IPv6MinimumSize:]
	// Walk a bounded number of extension headers to the transport header.
	for range 8 {
		switch next {
		case 0, 43, 60: // hop-by-hop, routing, destination options
			if len(payload) < 8 {
				return f, pktMalformed
			}
			n := (int(payload[1]) + 1) * 8
			if n > len(payload) {
				return f, pktMalformed
			}
			next, payload = payload[0], payload[n:]
			continue
		case 44: // fragment
			if len(payload) < 8 {
				return f, pktMalformed
			}
			if (uint16(payload[2])<<8|uint16(payload[3]))&0xfff8 != 0 {
				return f, pktFragment
			}
			next, payload = payload[0], payload[8:]
			continue
		}
		f.Proto = next
		return transport(f, payload)
	}
	return f, pktMalformed
}

// transport fills in ports or the ICMP type.
func transport(f rules.Flow, payload []byte) (rules.Flow, packetStatus) {
	switch f.Proto {
	case rules.IPProtoTCP, rules.IPProtoUDP:
		if len(payload) < 4 {
			return f, pktMalformed
		}
		ports := header.UDP(payload) // TCP and UDP start with the same two ports
		f.SrcPort, f.DstPort = ports.SourcePort(), ports.DestinationPort()
	case rules.IPProtoICMP, rules.IPProtoICMPv6:
		if len(payload) < 1 {
			return f, pktMalformed
		}
		f.ICMPType = payload[0]
	}
	return f, pktOK
}
