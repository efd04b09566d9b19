package main

import (
	"bytes"
	"encoding/json"
	"net/netip"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/google/gopacket"
	"github.com/google/gopacket/layers"
	"github.com/google/gopacket/pcapgo"
	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
	"gvisor.dev/gvisor/pkg/tcpip"
	"gvisor.dev/gvisor/pkg/tcpip/header"
)

const examples = "../../examples/"

func runSim(t *testing.T, stdin string, args ...string) (code int, stdout, stderr string) {
	t.Helper()
	var out, errOut bytes.Buffer
	code = run(args, strings.NewReader(stdin), &out, &errOut)
	return code, out.String(), errOut.String()
}

type jsonLine struct {
	Flow    string `json:"flow"`
	Verdict string `json:"verdict"`
	Rule    *int   `json:"rule"`
	Text    string `json:"text"`
	Reason  string `json:"reason"`
}

func decodeLines(t *testing.T, out string) []jsonLine {
	t.Helper()
	var lines []jsonLine
	for _, l := range strings.Split(strings.TrimSpace(out), "\n") {
		var j jsonLine
		dec := json.NewDecoder(strings.NewReader(l))
		dec.DisallowUnknownFields()
		require.NoError(t, dec.Decode(&j), "line %q", l)
		lines = append(lines, j)
	}
	return lines
}

func TestEvalJSONOnExamples(t *testing.T) {
	code, out, errOut := runSim(t, "", "eval", examples+"sys-firewall.qubesdb", "-flows", examples+"flows.txt", "-hosts", examples+"hosts", "-json")
	require.Equal(t, 0, code, errOut)
	lines := decodeLines(t, out)
	flows, err := loadFlows(examples+"flows.txt", nil)
	require.NoError(t, err)
	require.Len(t, lines, len(flows))
	type want struct {
		verdict string
		rule    int // -1: null
	}
	expected := map[string]want{
		"tcp 10.137.0.5:40000 -> 93.184.216.34:443":                 {"accept", 0},
		"udp 10.137.0.7:40001 -> 10.139.1.2:53":                     {"accept", 0},
		"tcp 10.137.0.7:40002 -> 198.51.100.25:993":                 {"accept", 1},
		"tcp 10.137.0.7:40003 -> 198.51.100.25:25":                  {"drop", -1},
		"tcp 10.137.0.7:40005 -> 192.0.2.17:22":                     {"accept", 4},
		"icmp 10.137.0.7 -> 8.8.8.8 type 8":                         {"drop", 5},
		"tcp [fd09:24ef:4179::a89:7]:40008 -> [2001:db8:80::1]:443": {"accept", 3},
		"tcp 10.137.0.9:40009 -> 93.184.216.34:443":                 {"drop", -1},
		"tcp 10.137.0.99:40010 -> 93.184.216.34:443":                {"drop", -1},
	}
	got := 0
	for i, l := range lines {
		assert.Equal(t, flows[i].text, l.Flow, "flows are echoed as given, in order")
		assert.NotEmpty(t, l.Reason)
		w, ok := expected[l.Flow]
		if !ok {
			continue
		}
		got++
		assert.Equal(t, w.verdict, l.Verdict, l.Flow)
		if w.rule < 0 {
			assert.Nil(t, l.Rule, l.Flow)
			assert.Equal(t, "policy", l.Text, l.Flow)
		} else if assert.NotNil(t, l.Rule, l.Flow) {
			assert.Equal(t, w.rule, *l.Rule, l.Flow)
			assert.Contains(t, l.Text, "action=", l.Flow)
		}
	}
	assert.Equal(t, len(expected), got)
	// The raw JSON really says null, not 0 or a missing key.
	assert.Contains(t, out, `"rule":null`)

	// A warning on stderr (never stdout) tells that 10.137.0.9 fails closed.
	assert.Equal(t, "qfw-sim: warning: ../../examples/sys-firewall.qubesdb: invalid rules block all traffic of 10.137.0.9 (qfw-sim check ../../examples/sys-firewall.qubesdb says why)\n", errOut)
}

func TestFlagsAnywhereAndUnquotedFlows(t *testing.T) {
	rules := "action=accept proto=tcp dstports=443-443\n"
	a, outA, _ := runSim(t, rules, "eval", "-json", "-", "tcp 10.137.0.5:1 -> 1.1.1.1:443", "udp 10.137.0.5 -> 1.1.1.1:443")
	b, outB, _ := runSim(t, rules, "eval", "-", "tcp", "10.137.0.5:1", "->", "1.1.1.1:443", "udp", "10.137.0.5", "->", "1.1.1.1:443", "--json")
	require.Equal(t, 0, a)
	require.Equal(t, 0, b)
	assert.Equal(t, outA, outB)
	lines := decodeLines(t, outA)
	require.Len(t, lines, 2)
	assert.Equal(t, "accept", lines[0].Verdict)
	assert.Equal(t, "drop", lines[1].Verdict)
	assert.Nil(t, lines[1].Rule)
}

func TestSingleTreeDump(t *testing.T) {
	tree := "0000 = action=accept proto=tcp dstports=443-443\npolicy = drop\n0001 = action=accept dst6=2001:db8::/32\n"
	code, out, errOut := runSim(t, tree, "eval", "-json", "-", "tcp 10.137.0.5 -> 1.1.1.1:443", "tcp [fd09::5]:1 -> [2001:db8::1]:80")
	require.Equal(t, 0, code, errOut)
	lines := decodeLines(t, out)
	require.Len(t, lines, 2)
	// A dst6 rule in a tree read as IPv4 is an error, as in the agent;
	// read as IPv6 the same tree is valid.
	assert.Equal(t, "drop", lines[0].Verdict)
	assert.Contains(t, lines[0].Reason, "IPv6 destination in the IPv4 rule set")
	assert.Equal(t, "accept", lines[1].Verdict)
	require.NotNil(t, lines[1].Rule)
	assert.Equal(t, 1, *lines[1].Rule)
}

func TestHostsForms(t *testing.T) {
	dir := t.TempDir()
	forms := map[string]string{
		"etc-hosts": "198.51.100.25 mail.example.com mx.example.com\n2001:db8::25 mail.example.com\n",
		"name-list": "mail.example.com 198.51.100.25 2001:db8::25\nmx.example.com: 198.51.100.25\n",
		"name-eq":   "mail.example.com = 198.51.100.25, 2001:db8::25\nmx.example.com=198.51.100.25\n",
		"json":      `{"mail.example.com": ["198.51.100.25", "2001:db8::25"], "mx.example.com": "198.51.100.25"}`,
	}
	rules := "action=accept dsthost=mail.example.com\naction=accept dsthost=mx.example.com proto=tcp\n"
	for name, text := range forms {
		path := filepath.Join(dir, name)
		require.NoError(t, os.WriteFile(path, []byte(text), 0o644))
		code, out, errOut := runSim(t, rules, "eval", "-json", "-hosts", path, "-",
			"tcp 10.137.0.5 -> 198.51.100.25:25", "tcp [fd09::5]:1 -> [2001:db8::25]:25", "tcp 10.137.0.5 -> 198.51.100.26:25")
		require.Equal(t, 0, code, "%s: %s", name, errOut)
		lines := decodeLines(t, out)
		require.Len(t, lines, 3)
		assert.Equal(t, "accept", lines[0].Verdict, name)
		// mx.example.com has no IPv6 address: the IPv6 tree fails closed.
		assert.Equal(t, "drop", lines[1].Verdict, name)
		assert.Contains(t, lines[1].Reason, "no IPv6 address for mx.example.com", name)
		assert.Equal(t, "drop", lines[2].Verdict, name)
	}
}

func TestEvalText(t *testing.T) {
	code, out, _ := runSim(t, "", "eval", examples+"dns-https-only.rules", "udp 10.137.0.5 -> 10.139.1.1:53", "tcp 10.137.0.5 -> 1.1.1.1:80")
	require.Equal(t, 0, code)
	lines := strings.Split(strings.TrimSpace(out), "\n")
	require.Len(t, lines, 2)
	assert.True(t, strings.HasPrefix(lines[0], "accept"), lines[0])
	assert.Contains(t, lines[0], "rule 0000: action=accept specialtarget=dns")
	assert.True(t, strings.HasPrefix(lines[1], "drop"), lines[1])
	assert.Contains(t, lines[1], "[policy]")
}

func TestCheck(t *testing.T) {
	code, out, errOut := runSim(t, "", "check", examples+"broken.rules")
	assert.Equal(t, exitInvalid, code)
	assert.Contains(t, out, `broken.rules:4: rule 0002: "dstports=80-80"`)
	assert.Contains(t, out, `broken.rules:5: rule 0003: "dst4=10.0.0.0/33"`)
	assert.Contains(t, out, `broken.rules:6: rule 0004: "action=allow"`)
	assert.Contains(t, errOut, "blocked entirely")

	for _, f := range []string{"default-appvm.rules", "dns-https-only.rules", "work-vm.rules"} {
		code, out, errOut := runSim(t, "", "check", examples+f, "-hosts", examples+"hosts")
		assert.Equal(t, exitOK, code, "%s: %s%s", f, out, errOut)
		assert.Contains(t, out, "IPv4: ")
		assert.Contains(t, out, "OK")
	}
	code, out, _ = runSim(t, "", "check", "-hosts", examples+"hosts", examples+"sys-firewall.qubesdb")
	assert.Equal(t, exitInvalid, code)
	assert.Contains(t, out, "10.137.0.9: BLOCKED")
	assert.Contains(t, out, "10.137.0.5: 1 rule, policy drop: OK")
}

func TestDiff(t *testing.T) {
	dir := t.TempDir()
	flows := filepath.Join(dir, "flows")
	require.NoError(t, os.WriteFile(flows, []byte("tcp 10.137.0.5 -> 1.1.1.1:443\ntcp 10.137.0.5 -> 1.1.1.1:80\nudp 10.137.0.5 -> 10.139.1.1:53\n"), 0o644))
	code, out, errOut := runSim(t, "", "diff", examples+"default-appvm.rules", examples+"dns-https-only.rules", "-flows", flows)
	require.Equal(t, 0, code, errOut)
	assert.Contains(t, out, "tcp 10.137.0.5 -> 1.1.1.1:80: accept -> drop")
	assert.NotContains(t, out, "1.1.1.1:443:")
	assert.Contains(t, out, "1 of 3 flows change their verdict")

	code, out, _ = runSim(t, "", "diff", "-json", examples+"dns-https-only.rules", examples+"default-appvm.rules", "-flows", flows)
	require.Equal(t, 0, code)
	var change struct {
		Flow     string
		Old, New jsonLine
	}
	require.NoError(t, json.Unmarshal([]byte(out), &change))
	assert.Equal(t, "tcp 10.137.0.5 -> 1.1.1.1:80", change.Flow)
	assert.Equal(t, "drop", change.Old.Verdict)
	assert.Equal(t, "accept", change.New.Verdict)
	require.NotNil(t, change.New.Rule)
	assert.Equal(t, 0, *change.New.Rule)
}

func TestBadInput(t *testing.T) {
	dir := t.TempDir()
	garbage := filepath.Join(dir, "garbage")
	require.NoError(t, os.WriteFile(garbage, []byte{0x7f, 'E', 'L', 'F', 0, 1, 2, 0xff}, 0o644))
	cases := map[string][]string{
		"no args":        {},
		"unknown cmd":    {"frobnicate"},
		"bad flag":       {"eval", "-nope", examples + "default-appvm.rules", "tcp 1.1.1.1 -> 2.2.2.2:1"},
		"missing file":   {"eval", filepath.Join(dir, "missing"), "tcp 1.1.1.1 -> 2.2.2.2:1"},
		"garbage rules":  {"check", garbage},
		"garbage flows":  {"eval", examples + "default-appvm.rules", "-flows", garbage},
		"malformed flow": {"eval", examples + "default-appvm.rules", "tcp 10.137.0.5 -> 1.1.1.1"},
		"no flows":       {"eval", examples + "default-appvm.rules"},
		"bad dump":       {"eval", garbage + "x", "tcp 1.1.1.1 -> 2.2.2.2:1"},
		"garbage pcap":   {"pcap", examples + "default-appvm.rules", garbage},
		"pcap no file":   {"pcap", examples + "default-appvm.rules"},
		"bad hosts":      {"eval", examples + "work-vm.rules", "-hosts", examples + "flows.txt", "tcp 1.1.1.1 -> 2.2.2.2:1"},
	}
	for name, args := range cases {
		t.Run(name, func(t *testing.T) {
			code, out, errOut := runSim(t, "", args...)
			assert.Equal(t, exitUsage, code)
			assert.Empty(t, out)
			assert.NotContains(t, errOut, "goroutine")
			assert.NotEmpty(t, strings.TrimSpace(errOut))
			if name != "no args" {
				assert.Equal(t, 1, strings.Count(errOut, "\n"), "one line: %q", errOut)
			}
		})
	}
	code, _, errOut := runSim(t, "not a dump\nx = y\n", "eval", "-", "tcp 1.1.1.1 -> 2.2.2.2:1")
	assert.Equal(t, 0, code, "a line without key=value tokens is a rule error, the flow is still evaluated: %s", errOut)
	code, _, errOut = runSim(t, "10.137.0.5/0000 = action=accept\nbogus line\n", "eval", "-", "tcp 10.137.0.5 -> 2.2.2.2:1")
	assert.Equal(t, exitUsage, code)
	assert.Contains(t, errOut, "stdin:2:")
}

// writePcap writes Ethernet frames built with gVisor's header encoders.
func writePcap(t *testing.T, frames [][]byte) string {
	t.Helper()
	path := filepath.Join(t.TempDir(), "capture.pcap")
	f, err := os.Create(path)
	require.NoError(t, err)
	defer f.Close()
	w := pcapgo.NewWriter(f)
	require.NoError(t, w.WriteFileHeader(65535, layers.LinkTypeEthernet))
	for i, fr := range frames {
		ci := gopacket.CaptureInfo{Timestamp: time.Unix(int64(1700000000+i), 0), CaptureLength: len(fr), Length: len(fr)}
		require.NoError(t, w.WritePacket(ci, fr))
	}
	return path
}

func ipv4Frame(src, dst string, proto uint8, l4 []byte) []byte {
	b := make([]byte, header.EthernetMinimumSize+header.IPv4MinimumSize+len(l4))
	header.Ethernet(b).Encode(&header.EthernetFields{Type: header.IPv4ProtocolNumber})
	ip := header.IPv4(b[header.EthernetMinimumSize:])
	ip.Encode(&header.IPv4Fields{
		TotalLength: uint16(header.IPv4MinimumSize + len(l4)), TTL: 64, Protocol: proto,
		SrcAddr: tcpip.AddrFromSlice(netip.MustParseAddr(src).AsSlice()),
		DstAddr: tcpip.AddrFromSlice(netip.MustParseAddr(dst).AsSlice()),
	})
	copy(ip.Payload(), l4)
	return b
}

func tcpSegment(sport, dport uint16) []byte {
	b := make([]byte, header.TCPMinimumSize)
	header.TCP(b).Encode(&header.TCPFields{SrcPort: sport, DstPort: dport, DataOffset: header.TCPMinimumSize, Flags: header.TCPFlagSyn})
	return b
}

func TestPcap(t *testing.T) {
	arp := make([]byte, header.EthernetMinimumSize+header.ARPSize)
	header.Ethernet(arp).Encode(&header.EthernetFields{Type: header.ARPProtocolNumber})
	echo := make([]byte, header.ICMPv4MinimumSize)
	header.ICMPv4(echo).SetType(header.ICMPv4Echo)
	path := writePcap(t, [][]byte{
		ipv4Frame("10.137.0.5", "1.1.1.1", 6, tcpSegment(40000, 443)), // accepted by rule 1
		ipv4Frame("10.137.0.5", "1.1.1.1", 6, tcpSegment(40000, 443)), // same flow
		ipv4Frame("10.137.0.5", "1.1.1.1", 6, tcpSegment(40001, 80)),  // policy
		ipv4Frame("1.1.1.1", "10.137.0.5", 6, tcpSegment(443, 40000)), // reply: not outgoing
		ipv4Frame("10.137.0.5", "10.139.1.1", 17, tcpSegment(5000, 53)),
		ipv4Frame("10.137.0.5", "8.8.8.8", 1, echo),
		arp,
		ipv4Frame("10.137.0.5", "1.1.1.1", 6, nil)[:30], // truncated
	})
	code, out, errOut := runSim(t, "", "pcap", examples+"dns-https-only.rules", path)
	require.Equal(t, 0, code, errOut)
	assert.Contains(t, out, "#1      accept  tcp 10.137.0.5:40000 -> 1.1.1.1:443  [rule 0001: action=accept proto=tcp dstports=443-443]")
	assert.Contains(t, out, "#3      drop    tcp 10.137.0.5:40001 -> 1.1.1.1:80  [policy]")
	assert.NotContains(t, out, "#4 ")
	assert.Contains(t, out, "#5      accept  udp 10.137.0.5:5000 -> 10.139.1.1:53")
	assert.Contains(t, out, "#6      drop    icmp 10.137.0.5 -> 8.8.8.8 type 8")
	assert.Contains(t, out, "accept         1        2  rule 0001: action=accept proto=tcp dstports=443-443")
	assert.Contains(t, out, "drop           2        2  policy")
	assert.Contains(t, out, "8 packets read; not from the client: 1, not IP: 1, malformed: 1")

	code, out, _ = runSim(t, "", "pcap", "-json", "-client", "1.1.1.1", examples+"dns-https-only.rules", path)
	require.Equal(t, 0, code)
	lines := strings.Split(strings.TrimSpace(out), "\n")
	require.Len(t, lines, 2, "one packet from 1.1.1.1 and the summary")
	assert.Contains(t, lines[0], `"packet":4`)
	var sum struct {
		Summary struct {
			Packets   int `json:"packets"`
			NotClient int `json:"not_from_client"`
			Rows      []struct {
				Rule    *int   `json:"rule"`
				Verdict string `json:"verdict"`
				Packets int    `json:"packets"`
			} `json:"rows"`
		} `json:"summary"`
	}
	require.NoError(t, json.Unmarshal([]byte(lines[1]), &sum))
	assert.Equal(t, 8, sum.Summary.Packets)
	assert.Equal(t, 5, sum.Summary.NotClient)
	require.Len(t, sum.Summary.Rows, 1)
	assert.Nil(t, sum.Summary.Rows[0].Rule, "to port 40000 no rule matches: the policy decides")
	assert.Equal(t, "drop", sum.Summary.Rows[0].Verdict)
}

func FuzzFlowOf(f *testing.F) {
	f.Add(ipv4Frame("10.137.0.5", "1.1.1.1", 6, tcpSegment(1, 2)), uint8(1))
	f.Add([]byte{0x60, 0, 0, 0, 0, 8, 44, 64}, uint8(101))
	f.Fuzz(func(t *testing.T, data []byte, link uint8) {
		fl, st := flowOf(layers.LinkType(link), data)
		if st == pktOK && !fl.Src.IsValid() {
			t.Fatalf("flow without a source: %+v", fl)
		}
	})
}

// FuzzInputs feeds arbitrary text as rules (raw or dump), hosts and flows:
// every outcome is a result or a one-line error, never a panic.
func FuzzInputs(f *testing.F) {
	f.Add("10.137.0.5/0000 = action=accept\n10.137.0.5/policy = drop\n", "1.2.3.4 a.example\n", "tcp 10.137.0.5 -> 1.1.1.1:80")
	f.Add("action=accept dsthost=a.example comment=x\n", `{"a.example": ["1.2.3.4"]}`, "udp 10.137.0.5 -> 1.2.3.4:53")
	f.Add("policy = drop\n0000 = action=drop proto=icmp\n", "a.example: 1.2.3.4, ::1", "icmp 10.137.0.5 -> 1.2.3.4 type 8")
	f.Fuzz(func(t *testing.T, rules, hosts, flow string) {
		dir := t.TempDir()
		hostsFile := filepath.Join(dir, "hosts")
		if err := os.WriteFile(hostsFile, []byte(hosts), 0o644); err != nil {
			t.Fatal(err)
		}
		code, out, errOut := runSim(t, rules, "eval", "-json", "-hosts", hostsFile, "-", flow)
		switch code {
		case exitOK:
			if strings.Count(out, "\n") == 0 {
				t.Fatalf("exit 0 without a result")
			}
		case exitUsage:
			if out != "" || strings.Count(strings.TrimSpace(errOut), "\n") > 1 {
				t.Fatalf("error with output %q / %q", out, errOut)
			}
		default:
			t.Fatalf("exit %d", code)
		}
	})
}
