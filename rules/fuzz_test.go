package rules

import (
	"net/netip"
	"strings"
	"testing"
)

// FuzzParse feeds arbitrary rule text to both parsers and checks the
// invariants every rule set keeps: no panic, errors imply block-all, and
// Check answers with a rule that exists.
func FuzzParse(f *testing.F) {
	for _, seed := range []string{
		"action=accept",
		"action=accept proto=tcp dst4=1.2.3.0/24 dstports=80-80",
		"action=accept proto=udp dsthost=yum.qubes-os.org dstports=443-1024",
		"action=drop proto=udp specialtarget=dns",
		"action=accept proto=icmp icmptype=8",
		"action=accept dst6=2001:db8::/32 proto=tcp expire=1900000000 comment=x y=z",
		"action=accept  proto=tcp",
		"action=accept dst4=a=b",
		"action=accept specialtarget=dns dstports=53-54",
		"proto=icmp icmptype=999 dstports=5-1",
	} {
		f.Add(seed, "drop")
	}
	resolver := StaticResolver{"yum.qubes-os.org": {netip.MustParseAddr("193.219.28.150"), netip.MustParseAddr("2001:db8::1")}}
	flows := []Flow{
		{Proto: IPProtoTCP, Src: client4, Dst: netip.MustParseAddr("1.2.3.4"), DstPort: 80},
		{Proto: IPProtoUDP, Src: client4, Dst: netip.MustParseAddr("10.139.1.1"), DstPort: 53},
		{Proto: IPProtoICMPv6, Src: client6, Dst: netip.MustParseAddr("2001:db8::1"), ICMPType: 128},
	}
	f.Fuzz(func(t *testing.T, rule, policy string) {
		for _, fam := range []Family{IPv4, IPv6} {
			opt := Options{Family: fam, Resolver: resolver}
			sets := []*Ruleset{
				ParseQubesDB(map[string]string{"0000": rule, "policy": policy}, opt),
				ParseRaw(rule+"\n"+strings.ReplaceAll(rule, " ", "\n"), opt),
			}
			for _, rs := range sets {
				if rs.Blocked() != (rs.ErrorCount() > 0) {
					t.Fatalf("Blocked() disagrees with ErrorCount()")
				}
				for _, fl := range flows {
					v := rs.Check(fl)
					if rs.Blocked() && (v.Action != Drop || v.Index != -1) {
						t.Fatalf("blocked rule set decided %+v", v)
					}
					if v.Index >= len(rs.Rules()) || (v.Index >= 0 && rs.Rules()[v.Index].Text != v.Text) {
						t.Fatalf("verdict names rule %d of %d", v.Index, len(rs.Rules()))
					}
				}
			}
		}
	})
}

// FuzzParseFlow checks that any accepted flow text round-trips through
// String.
func FuzzParseFlow(f *testing.F) {
	for _, seed := range []string{
		"tcp 10.137.0.5:40000 -> 93.184.216.34:443",
		"udp 10.137.0.5 -> 10.139.1.1:53",
		"icmp 10.137.0.5 -> 8.8.8.8 type 8",
		"tcp [fd09:24ef:4179::a89:5]:1 -> [2001:db8::1]:443",
		"47 1.2.3.4 -> 5.6.7.8",
		"icmp ::ffff:1.2.3.4 -> 1.2.3.5",
	} {
		f.Add(seed)
	}
	f.Fuzz(func(t *testing.T, s string) {
		fl, err := ParseFlow(s)
		if err != nil {
			return
		}
		again, err := ParseFlow(fl.String())
		if err != nil || again != fl {
			t.Fatalf("%q -> %q -> %+v, %v", s, fl.String(), again, err)
		}
	})
}
