package tapnet_test

import (
	"encoding/binary"
	"errors"
	"io"
	"net"
	"net/netip"
	"strings"
	"testing"
	"time"

	"github.com/google/gopacket"
	"github.com/google/gopacket/layers"
	"github.com/stretchr/testify/require"
)

// dnsZone is what the upstream DNS server answers: A records only.
type dnsZone map[string]netip.Addr

// answer builds the reply to one DNS query, or nil for something that is not
// a query (dropped, as a server would).
func (z dnsZone) answer(query []byte) []byte {
	var q layers.DNS
	if err := q.DecodeFromBytes(query, gopacket.NilDecodeFeedback); err != nil || q.QR || len(q.Questions) != 1 {
		return nil
	}
	question := q.Questions[0]
	reply := layers.DNS{
		ID: q.ID, QR: true, OpCode: q.OpCode, AA: true, RD: q.RD, RA: true,
		Questions: q.Questions, ResponseCode: layers.DNSResponseCodeNXDomain,
	}
	name := strings.ToLower(strings.TrimSuffix(string(question.Name), "."))
	if addr, ok := z[name]; ok {
		reply.ResponseCode = layers.DNSResponseCodeNoErr
		if question.Type == layers.DNSTypeA && question.Class == layers.DNSClassIN {
			reply.Answers = []layers.DNSResourceRecord{{
				Name: question.Name, Type: layers.DNSTypeA, Class: layers.DNSClassIN,
				TTL: 60, IP: addr.AsSlice(),
			}}
		}
	}
	buf := gopacket.NewSerializeBuffer()
	if err := reply.SerializeTo(buf, gopacket.SerializeOptions{FixLengths: true}); err != nil {
		return nil
	}
	return buf.Bytes()
}

// serveDNS answers over UDP and TCP on the given sockets until they are closed.
func (z dnsZone) serveDNS(udp []net.PacketConn, tcp net.Listener) {
	for _, c := range udp {
		go func() {
			buf := make([]byte, 1500)
			for {
				n, from, err := c.ReadFrom(buf)
				if err != nil {
					return
				}
				if reply := z.answer(buf[:n]); reply != nil {
					c.WriteTo(reply, from)
				}
			}
		}()
	}
	go func() {
		for {
			c, err := tcp.Accept()
			if err != nil {
				return
			}
			go z.serveDNSConn(c)
		}
	}()
}

// serveDNSConn answers length-prefixed queries on one TCP connection.
func (z dnsZone) serveDNSConn(c net.Conn) {
	defer c.Close()
	c.SetDeadline(time.Now().Add(30 * time.Second))
	for {
		var size [2]byte
		if _, err := io.ReadFull(c, size[:]); err != nil {
			return
		}
		query := make([]byte, binary.BigEndian.Uint16(size[:]))
		if _, err := io.ReadFull(c, query); err != nil {
			return
		}
		reply := z.answer(query)
		if reply == nil {
			return
		}
		if _, err := c.Write(binary.BigEndian.AppendUint16(nil, uint16(len(reply)))); err != nil {
			return
		}
		if _, err := c.Write(reply); err != nil {
			return
		}
	}
}

// dnsQuery is an A query for name with the given ID.
func dnsQuery(t *testing.T, id uint16, name string) []byte {
	t.Helper()
	q := layers.DNS{ID: id, RD: true, QDCount: 1, Questions: []layers.DNSQuestion{{
		Name: []byte(name), Type: layers.DNSTypeA, Class: layers.DNSClassIN,
	}}}
	buf := gopacket.NewSerializeBuffer()
	require.NoError(t, q.SerializeTo(buf, gopacket.SerializeOptions{FixLengths: true}))
	return buf.Bytes()
}

// dnsAnswerA reads the A record of a reply to query id.
func dnsAnswerA(reply []byte, id uint16) (netip.Addr, error) {
	var r layers.DNS
	if err := r.DecodeFromBytes(reply, gopacket.NilDecodeFeedback); err != nil {
		return netip.Addr{}, err
	}
	if r.ID != id || !r.QR {
		return netip.Addr{}, errors.New("reply does not answer the query")
	}
	for _, a := range r.Answers {
		if a.Type == layers.DNSTypeA {
			addr, _ := netip.AddrFromSlice(a.IP.To4())
			return addr, nil
		}
	}
	return netip.Addr{}, errors.New("reply has no A record: " + r.ResponseCode.String())
}
