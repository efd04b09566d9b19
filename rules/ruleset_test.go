package rules

import (
	"fmt"
	"net/netip"
	"strings"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
)

var (
	client4 = netip.MustParseAddr("10.137.0.5")
	client6 = netip.MustParseAddr("fd09:24ef:4179::a89:5")
)

func mustFlow(t testing.TB, s string) Flow {
	t.Helper()
	f, err := ParseFlow(s)
	require.NoError(t, err, s)
	return f
}

func tcp4(dst string, port uint16) Flow {
	return Flow{Proto: IPProtoTCP, Src: client4, Dst: netip.MustParseAddr(dst), SrcPort: 40000, DstPort: port}
}

func udp4(dst string, port uint16) Flow {
	f := tcp4(dst, port)
	f.Proto = IPProtoUDP
	return f
}

func icmp4(dst string, typ uint8) Flow {
	return Flow{Proto: IPProtoICMP, Src: client4, Dst: netip.MustParseAddr(dst), ICMPType: typ}
}

// expect is one flow and the verdict the Linux agent's nft rules give it:
// the action and the deciding rule number (-1: the policy or block-all).
type expect struct {
	flow   Flow
	action Action
	number int
}

func checkAll(t *testing.T, rs *Ruleset, cases []expect) {
	t.Helper()
	for _, c := range cases {
		v := rs.Check(c.flow)
		assert.Equal(t, c.action, v.Action, "%v: %s", c.flow, v.Reason)
		assert.Equal(t, c.number, v.Number, "%v: deciding rule (%s)", c.flow, v.Reason)
		if c.number < 0 {
			assert.Equal(t, PolicyText, v.Text)
		} else {
			assert.Equal(t, rs.Rules()[v.Index].Text, v.Text)
		}
		assert.NotEmpty(t, v.Reason)
	}
}

var hosts = StaticResolver{
	"yum.qubes-os.org": {netip.MustParseAddr("193.219.28.150")},
	"dual.example":     {netip.MustParseAddr("192.0.2.7"), netip.MustParseAddr("2001:db8::7")},
	"v4only.example":   {netip.MustParseAddr("192.0.2.8")},
}

// The default rule set dom0 writes for a qube without firewall.xml.
func TestDefaultAppVM(t *testing.T) {
	rs := ParseQubesDB(map[string]string{"0000": "action=accept", "policy": "drop"}, Options{Family: IPv4})
	require.False(t, rs.Blocked(), rs.Errors())
	checkAll(t, rs, []expect{
		{tcp4("93.184.216.34", 443), Accept, 0},
		{udp4("10.139.1.1", 53), Accept, 0},
		{icmp4("8.8.8.8", 8), Accept, 0},
		{Flow{Proto: 47, Src: client4, Dst: netip.MustParseAddr("1.1.1.1")}, Accept, 0},
	})
}

// The rules of qubes-core-agent-linux test_firewall.py test_002, with DNS
// servers 1.1.1.1 and 2.2.2.2, whose nft output is quoted in the spec (3.3).
func TestAgentTest002(t *testing.T) {
	rs := ParseQubesDB(map[string]string{
		"0000":   "action=accept proto=tcp dst4=1.2.3.0/24 dstports=80-80",
		"0001":   "action=accept proto=udp dsthost=yum.qubes-os.org dstports=443-1024",
		"0002":   "action=accept specialtarget=dns",
		"0003":   "action=drop proto=udp specialtarget=dns",
		"0004":   "action=drop proto=icmp",
		"policy": "drop",
	}, Options{Family: IPv4, Resolver: hosts, DNSServers: []netip.Addr{
		netip.MustParseAddr("1.1.1.1"), netip.MustParseAddr("2.2.2.2")}})
	require.False(t, rs.Blocked(), rs.Errors())
	checkAll(t, rs, []expect{
		{tcp4("1.2.3.4", 80), Accept, 0},
		{tcp4("1.2.3.255", 80), Accept, 0},
		{tcp4("1.2.3.4", 81), Drop, -1},
		{udp4("1.2.3.4", 80), Drop, -1},
		{udp4("193.219.28.150", 443), Accept, 1},
		{udp4("193.219.28.150", 1024), Accept, 1},
		{udp4("193.219.28.150", 1025), Drop, -1},
		{tcp4("193.219.28.150", 443), Drop, -1},
		{tcp4("1.1.1.1", 53), Accept, 2},
		{udp4("2.2.2.2", 53), Accept, 2},
		{udp4("10.139.1.1", 53), Drop, -1}, // not a configured DNS server here
		{tcp4("1.1.1.1", 54), Drop, -1},
		{icmp4("1.1.1.1", 8), Drop, 4},
		{icmp4("9.9.9.9", 0), Drop, 4},
	})
	// Rule 0003 can never decide: 0002 already accepts UDP DNS.
	for _, f := range []Flow{udp4("1.1.1.1", 53), udp4("2.2.2.2", 53)} {
		assert.Equal(t, 2, rs.Check(f).Number)
	}
}

func TestSpecialTargetDNS(t *testing.T) {
	opt := Options{Family: IPv4}
	t.Run("default servers, tcp and udp 53", func(t *testing.T) {
		rs := ParseQubesDB(map[string]string{"0000": "action=accept specialtarget=dns", "policy": "drop"}, opt)
		checkAll(t, rs, []expect{
			{udp4("10.139.1.1", 53), Accept, 0},
			{tcp4("10.139.1.2", 53), Accept, 0},
			{udp4("10.139.1.3", 53), Drop, -1},
			{udp4("8.8.8.8", 53), Drop, -1},
			{udp4("10.139.1.1", 5353), Drop, -1},
			{icmp4("10.139.1.1", 8), Drop, -1},
		})
	})
	t.Run("proto narrows to one protocol", func(t *testing.T) {
		rs := ParseQubesDB(map[string]string{"0007": "action=accept proto=udp specialtarget=dns", "policy": "drop"}, opt)
		checkAll(t, rs, []expect{{udp4("10.139.1.1", 53), Accept, 7}, {tcp4("10.139.1.1", 53), Drop, -1}})
	})
	t.Run("dstports 53 is allowed", func(t *testing.T) {
		for _, ports := range []string{"53-53", "53"} {
			rs := ParseQubesDB(map[string]string{"0000": "action=accept proto=tcp specialtarget=dns dstports=" + ports, "policy": "drop"}, opt)
			require.False(t, rs.Blocked(), rs.Errors())
			checkAll(t, rs, []expect{{tcp4("10.139.1.2", 53), Accept, 0}})
		}
	})
	t.Run("other dstports skip the rule", func(t *testing.T) {
		for _, ports := range []string{"53-54", "80-80", "1-65535"} {
			rs := ParseQubesDB(map[string]string{
				"0000": "action=accept proto=udp specialtarget=dns dstports=" + ports, "0001": "action=drop proto=udp", "policy": "accept"}, opt)
			require.False(t, rs.Blocked(), rs.Errors())
			assert.NotEmpty(t, rs.Rules()[0].Skipped)
			checkAll(t, rs, []expect{{udp4("10.139.1.1", 53), Drop, 1}, {udp4("10.139.1.1", 54), Drop, 1}})
		}
	})
	t.Run("never matches IPv6", func(t *testing.T) {
		rs := ParseQubesDB(map[string]string{"0000": "action=accept specialtarget=dns", "policy": "drop"},
			Options{Family: IPv6, DNSServers: append(DefaultDNSServers, netip.MustParseAddr("fd00::53"))})
		require.False(t, rs.Blocked())
		v := rs.Check(Flow{Proto: IPProtoUDP, Src: client6, Dst: netip.MustParseAddr("fd00::53"), DstPort: 53})
		assert.Equal(t, Accept, v.Action, "an IPv6 nameserver of the VM is in the IPv6 dns-addr set")
		rs = ParseQubesDB(map[string]string{"0000": "action=accept specialtarget=dns", "policy": "drop"}, Options{Family: IPv6})
		v = rs.Check(Flow{Proto: IPProtoUDP, Src: client6, Dst: netip.MustParseAddr("::ffff:10.139.1.1"), DstPort: 53})
		assert.Equal(t, Drop, v.Action)
		assert.Equal(t, -1, v.Number)
	})
}

func TestMatching(t *testing.T) {
	rs := ParseQubesDB(map[string]string{
		"0000":   "action=drop dst4=192.168.0.1/24",      // host bits masked
		"0002":   "action=accept proto=icmp icmptype=8",  // gap at 0001 is fine
		"0003":   "action=accept icmptype=0",             // icmptype implies icmp
		"0010":   "action=accept dstports=1000-1001",     // ports without proto: tcp and udp
		"0011":   "action=accept proto=tcp dstports=0-0", // edge ports
		"0012":   "action=accept proto=udp dstports=65535-65535",
		"0013":   "action=drop dst4=0.0.0.0/0 proto=tcp",
		"policy": "accept",
	}, Options{Family: IPv4})
	require.False(t, rs.Blocked(), rs.Errors())
	checkAll(t, rs, []expect{
		{tcp4("192.168.0.77", 1000), Drop, 0},
		{icmp4("192.168.1.1", 8), Accept, 2},
		{icmp4("192.168.1.1", 0), Accept, 3},
		{icmp4("192.168.1.1", 3), Accept, -1},
		{tcp4("8.8.8.8", 1000), Accept, 10},
		{udp4("8.8.8.8", 1001), Accept, 10},
		{tcp4("8.8.8.8", 1002), Drop, 13},
		{udp4("8.8.8.8", 999), Accept, -1},
		{tcp4("8.8.8.8", 0), Accept, 11},
		{udp4("8.8.8.8", 65535), Accept, 12},
		{Flow{Proto: 47, Src: client4, Dst: netip.MustParseAddr("8.8.8.8")}, Accept, -1},
	})
}

func TestIPv6Tree(t *testing.T) {
	rs := ParseQubesDB(map[string]string{
		"0000":   "action=accept proto=tcp dst6=2001:DB8::1/64 dstports=443-443",
		"0001":   "action=drop proto=icmp icmptype=128",
		"0002":   "action=accept dsthost=dual.example",
		"policy": "drop",
	}, Options{Family: IPv6, Resolver: hosts})
	require.False(t, rs.Blocked(), rs.Errors())
	tcp := func(dst string, port uint16) Flow {
		return Flow{Proto: IPProtoTCP, Src: client6, Dst: netip.MustParseAddr(dst), DstPort: port}
	}
	checkAll(t, rs, []expect{
		{tcp("2001:db8::ffff", 443), Accept, 0},
		{tcp("2001:db9::1", 443), Drop, -1},
		{Flow{Proto: IPProtoICMPv6, Src: client6, Dst: netip.MustParseAddr("2001:db9::1"), ICMPType: 128}, Drop, 1},
		{Flow{Proto: IPProtoICMP, Src: client6, Dst: netip.MustParseAddr("2001:db9::1"), ICMPType: 128}, Drop, -1},
		{tcp("2001:db8::7", 22), Accept, 2},
	})
}

// dsthost is resolved per family: a name without an address in one family
// blocks that family only.
func TestDsthostPerFamily(t *testing.T) {
	entries := map[string]string{"0000": "action=accept dsthost=v4only.example", "policy": "drop"}
	rs4 := ParseQubesDB(entries, Options{Family: IPv4, Resolver: hosts})
	rs6 := ParseQubesDB(entries, Options{Family: IPv6, Resolver: hosts})
	require.False(t, rs4.Blocked(), rs4.Errors())
	assert.Equal(t, Accept, rs4.Check(tcp4("192.0.2.8", 80)).Action)
	require.True(t, rs6.Blocked())
	assert.Contains(t, rs6.Errors()[0].Error(), "dsthost=v4only.example")

	noResolver := ParseQubesDB(entries, Options{Family: IPv4})
	assert.True(t, noResolver.Blocked())
	unknown := ParseQubesDB(map[string]string{"0000": "action=accept dsthost=nx.example", "policy": "drop"}, Options{Family: IPv4, Resolver: hosts})
	assert.True(t, unknown.Blocked())
}

// Any error blocks the whole tree (fail closed), naming the rule and token.
func TestErrorsBlockAll(t *testing.T) {
	cases := []struct {
		entries map[string]string
		want    string // substring of the first error
	}{
		{map[string]string{"0000": "action=accept"}, "no policy"},
		{map[string]string{"0000": "action=accept", "policy": "reject"}, "policy must be"},
		{map[string]string{"0000": "proto=tcp", "policy": "drop"}, "rule 0000: missing action"},
		{map[string]string{"0000": "action=allow", "policy": "drop"}, `"action=allow"`},
		{map[string]string{"0000": "action=accept foo=bar", "policy": "drop"}, `unknown option "foo"`},
		{map[string]string{"0000": "action=accept expire=1", "policy": "drop"}, `unknown option "expire"`},
		{map[string]string{"0000": "action=accept proto=tcp proto=udp", "policy": "drop"}, "duplicate option"},
		{map[string]string{"0000": "action=accept dstports=80-80 proto=icmp", "policy": "drop"}, "dstports=80-80"},
		{map[string]string{"0000": "action=accept proto=tcp icmptype=8", "policy": "drop"}, "icmptype needs proto=icmp"},
		{map[string]string{"0000": "action=accept proto=tcp dstports=1024-80", "policy": "drop"}, "backwards"},
		{map[string]string{"0000": "action=accept proto=tcp dstports=80-65536", "policy": "drop"}, "dstports=80-65536"},
		{map[string]string{"0000": "action=accept proto=icmp icmptype=256", "policy": "drop"}, "icmptype=256"},
		{map[string]string{"0000": "action=accept dst4=10.0.0.1/33", "policy": "drop"}, "prefix length"},
		{map[string]string{"0000": "action=accept dst4=10.0.0", "policy": "drop"}, "not an IPv4"},
		{map[string]string{"0000": "action=accept dst6=2001:db8::/64", "policy": "drop"}, "IPv6 destination in the IPv4"},
		{map[string]string{"0000": "action=accept dst4=1.2.3.4 dsthost=a.b", "policy": "drop"}, "at most one destination"},
		{map[string]string{"0000": "action=accept dsthost=Bad.Host", "policy": "drop"}, "host name"},
		{map[string]string{"0000": "action=accept specialtarget=web", "policy": "drop"}, "special target"},
		{map[string]string{"0000": "action=accept proto=icmp specialtarget=dns", "policy": "drop"}, "not icmp"},
		{map[string]string{"0000": "action=accept  proto=tcp", "policy": "drop"}, "empty token"},
		{map[string]string{"0000": "action=accept ", "policy": "drop"}, "empty token"},
		{map[string]string{"0000": "", "policy": "drop"}, "empty token"},
		{map[string]string{"0000": "action=accept comment=x", "policy": "drop"}, `unknown option "comment"`},
		{map[string]string{"0000": "action=accept proto", "policy": "drop"}, "not a key=value"},
		{map[string]string{"0000": "action=accept dst4=a=b", "policy": "drop"}, "more than one '='"},
		{map[string]string{"00001": "action=accept", "policy": "drop"}, "four digits"},
		{map[string]string{"abcd": "action=accept", "policy": "drop"}, "four digits"},
		{map[string]string{"0000": "action=accept", "policy": "drop", "": "x"}, "four digits"},
	}
	for _, c := range cases {
		t.Run(fmt.Sprint(c.entries), func(t *testing.T) {
			rs := ParseQubesDB(c.entries, Options{Family: IPv4, Resolver: hosts})
			require.True(t, rs.Blocked())
			assert.Contains(t, rs.Errors()[0].Error(), c.want)
			v := rs.Check(tcp4("1.1.1.1", 443))
			assert.Equal(t, Drop, v.Action)
			assert.Equal(t, -1, v.Number)
			assert.Contains(t, v.Reason, "blocked")
		})
	}
}

func TestErrorsAreBounded(t *testing.T) {
	entries := map[string]string{}
	for i := 0; i < 500; i++ {
		entries[fmt.Sprintf("%04d", i)] = "action=nope"
	}
	rs := ParseQubesDB(entries, Options{Family: IPv4})
	assert.Len(t, rs.Errors(), maxErrors)
	assert.Equal(t, 501, rs.ErrorCount()) // 500 rules + missing policy
}

func TestRawList(t *testing.T) {
	now := time.Unix(1_800_000_000, 0)
	text := `# work VM
action=accept proto=tcp dsthost=dual.example dstports=443-443 comment=corp mail = imap & web
action=accept dst6=2001:db8::/32 proto=tcp
action=accept proto=tcp dst4=203.0.113.0/24 expire=1700000000

action=accept proto=tcp dst4=203.0.113.0/24 dstports=22-22 expire=1900000000
action=accept specialtarget=dns
action=drop
`
	rs4 := ParseRaw(text, Options{Family: IPv4, Resolver: hosts, Now: now})
	require.False(t, rs4.Blocked(), rs4.Errors())
	require.Len(t, rs4.Rules(), 6)
	assert.Equal(t, "corp mail = imap & web", rs4.Rules()[0].Comment)
	assert.Equal(t, 2, rs4.Rules()[0].Line)
	assert.Contains(t, rs4.Rules()[2].Skipped, "expired")
	checkAll(t, rs4, []expect{
		{tcp4("192.0.2.7", 443), Accept, 0},
		{tcp4("203.0.113.9", 80), Drop, 5}, // rule 2 expired
		{tcp4("203.0.113.9", 22), Accept, 3},
		{udp4("10.139.1.2", 53), Accept, 4},
	})
	rs6 := ParseRaw(text, Options{Family: IPv6, Resolver: hosts, Now: now})
	require.False(t, rs6.Blocked(), rs6.Errors())
	tcp6 := Flow{Proto: IPProtoTCP, Src: client6, Dst: netip.MustParseAddr("2001:db8:1::1"), DstPort: 80}
	assert.Equal(t, 1, rs6.Check(tcp6).Number)

	bad := ParseRaw("action=accept\naction=accept proto=tcp dstports=99999\n", Options{Family: IPv4})
	require.True(t, bad.Blocked())
	assert.Equal(t, "line 2: rule 0001: \"dstports=99999\": ports must be N-M with 0 <= N <= M <= 65535", bad.Errors()[0].Error())
}

func TestRawComments(t *testing.T) {
	rs := ParseRaw("action=accept   proto=tcp\tcomment=a comment=b  \naction=drop xcomment=1\n", Options{Family: IPv4})
	require.True(t, rs.Blocked())
	assert.Equal(t, "a comment=b", rs.Rules()[0].Comment)
	assert.Equal(t, ProtoTCP, rs.Rules()[0].Proto)
	require.Len(t, rs.Errors(), 1)
	assert.Contains(t, rs.Errors()[0].Error(), `line 2: rule 0001: "xcomment=1": unknown option`)
}

func TestRawLineTooLong(t *testing.T) {
	rs := ParseRaw("action=accept comment="+strings.Repeat("x", 5000), Options{Family: IPv4})
	assert.True(t, rs.Blocked())
}

func TestDiff(t *testing.T) {
	old := ParseQubesDB(map[string]string{"0000": "action=accept", "policy": "drop"}, Options{Family: IPv4})
	new := ParseQubesDB(map[string]string{"0000": "action=accept proto=tcp dstports=443-443", "0001": "action=accept specialtarget=dns", "policy": "drop"}, Options{Family: IPv4})
	flows := []Flow{tcp4("1.1.1.1", 443), tcp4("1.1.1.1", 80), udp4("10.139.1.1", 53), icmp4("1.1.1.1", 8)}
	changes := Diff(old, new, flows)
	require.Len(t, changes, 2)
	assert.Equal(t, flows[1], changes[0].Flow)
	assert.Equal(t, Accept, changes[0].Old.Action)
	assert.Equal(t, Drop, changes[0].New.Action)
	assert.Equal(t, flows[3], changes[1].Flow)
}

func TestParseFlow(t *testing.T) {
	good := map[string]Flow{
		"tcp 10.137.0.5:40000 -> 93.184.216.34:443":          {Proto: IPProtoTCP, Src: client4, SrcPort: 40000, Dst: netip.MustParseAddr("93.184.216.34"), DstPort: 443},
		"udp 10.137.0.5 -> 10.139.1.1:53":                    {Proto: IPProtoUDP, Src: client4, Dst: netip.MustParseAddr("10.139.1.1"), DstPort: 53},
		"icmp 10.137.0.5 -> 8.8.8.8 type 0":                  {Proto: IPProtoICMP, Src: client4, Dst: netip.MustParseAddr("8.8.8.8"), ICMPType: 0},
		"ICMP 10.137.0.5 -> 8.8.8.8":                         {Proto: IPProtoICMP, Src: client4, Dst: netip.MustParseAddr("8.8.8.8"), ICMPType: 8},
		"tcp [fd09:24ef:4179::a89:5]:1 -> [2001:db8::1]:443": {Proto: IPProtoTCP, Src: client6, SrcPort: 1, Dst: netip.MustParseAddr("2001:db8::1"), DstPort: 443},
		"icmp fd09:24ef:4179::a89:5 -> 2001:db8::1":          {Proto: IPProtoICMPv6, Src: client6, Dst: netip.MustParseAddr("2001:db8::1"), ICMPType: 128},
		"47 10.137.0.5 -> 1.2.3.4":                           {Proto: 47, Src: client4, Dst: netip.MustParseAddr("1.2.3.4")},
	}
	for s, want := range good {
		got, err := ParseFlow(s)
		require.NoError(t, err, s)
		assert.Equal(t, want, got, s)
		again, err := ParseFlow(got.String())
		require.NoError(t, err, got.String())
		assert.Equal(t, got, again, "String round trip of %q", s)
	}
	for _, s := range []string{
		"", "tcp", "tcp 10.137.0.5 93.184.216.34:443", "tcp 10.137.0.5 -> 93.184.216.34",
		"tcp 10.137.0.5 -> 93.184.216.34:99999", "sctp 10.137.0.5 -> 1.1.1.1", "tcp 10.137.0.5 -> [2001:db8::1]:80",
		"icmp 10.137.0.5 -> 1.1.1.1 type 300", "icmp 10.137.0.5 -> 1.1.1.1:5", "icmp 10.137.0.5 -> 1.1.1.1 code 3",
		"udp 10.137.0.5 -> 1.1.1.1:53 extra", "tcp fe80::1%eth0 -> [fe80::2]:1", "icmpv6 10.137.0.5 -> 1.1.1.1",
	} {
		_, err := ParseFlow(s)
		assert.Error(t, err, s)
	}
}

func TestCheckDoesNotAllocate(t *testing.T) {
	rs := benchRuleset(100)
	f := tcp4("93.184.216.34", 443)
	allocs := testing.AllocsPerRun(100, func() { _ = rs.Check(f) })
	assert.Zero(t, allocs)
}

// benchRuleset has n rules none of which matches the benchmark flow, so Check
// walks them all before the policy decides.
func benchRuleset(n int) *Ruleset {
	entries := map[string]string{"policy": "drop"}
	for i := 0; i < n; i++ {
		entries[fmt.Sprintf("%04d", i)] = fmt.Sprintf("action=accept proto=tcp dst4=192.0.%d.%d/32 dstports=%d-%d", i/256, i%256, 1000+i, 1000+i)
	}
	return ParseQubesDB(entries, Options{Family: IPv4})
}

func BenchmarkCheck(b *testing.B) {
	for _, n := range []int{1, 10, 100} {
		b.Run(fmt.Sprintf("rules=%d", n), func(b *testing.B) {
			rs := benchRuleset(n)
			f := tcp4("93.184.216.34", 443)
			b.ReportAllocs()
			for b.Loop() {
				if rs.Check(f).Action != Drop {
					b.Fatal("unexpected verdict")
				}
			}
		})
	}
}
