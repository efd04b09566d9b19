package tapnet_test

import (
	"context"
	"encoding/binary"
	"errors"
	"io"
	"net"
	"net/netip"
	"strings"
	"testing"
	"time"

	"github.com/stretchr/testify/require"
	"golang.org/x/net/dns/dnsmessage"
)

// dnsZone is what the upstream DNS server answers: A records only.
type dnsZone map[string]netip.Addr

// answer builds the reply to one DNS query, or nil for something that is not
// a query (dropped, as a server would).
func (z dnsZone) answer(query []byte) []byte {
	var p dnsmessage.Parser
	h, err := p.Start(query)
	if err != nil || h.Response {
		return nil
	}
	q, err := p.Question()
	if err != nil {
		return nil
	}
	addr, known := z[strings.ToLower(strings.TrimSuffix(q.Name.String(), "."))]
	rcode := dnsmessage.RCodeNameError
	if known {
		rcode = dnsmessage.RCodeSuccess
	}
	b := dnsmessage.NewBuilder(nil, dnsmessage.Header{
		ID: h.ID, Response: true, Authoritative: true, RecursionDesired: h.RecursionDesired,
		RecursionAvailable: true, RCode: rcode,
	})
	if b.StartQuestions() != nil || b.Question(q) != nil || b.StartAnswers() != nil {
		return nil
	}
	if known && q.Type == dnsmessage.TypeA && q.Class == dnsmessage.ClassINET {
		rh := dnsmessage.ResourceHeader{Name: q.Name, Class: dnsmessage.ClassINET, TTL: 60}
		if b.AResource(rh, dnsmessage.AResource{A: addr.As4()}) != nil {
			return nil
		}
	}
	reply, err := b.Finish()
	if err != nil {
		return nil
	}
	return reply
}

// serveDNS answers over UDP and TCP on the given sockets until they are closed.
func (z dnsZone) serveDNS(udp []net.PacketConn, tcp []net.Listener) {
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
	for _, l := range tcp {
		go func() {
			for {
				c, err := l.Accept()
				if err != nil {
					return
				}
				go z.serveDNSConn(c)
			}
		}()
	}
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
	b := dnsmessage.NewBuilder(nil, dnsmessage.Header{ID: id, RecursionDesired: true})
	require.NoError(t, b.StartQuestions())
	require.NoError(t, b.Question(dnsmessage.Question{
		Name: dnsmessage.MustNewName(name + "."), Type: dnsmessage.TypeA, Class: dnsmessage.ClassINET,
	}))
	query, err := b.Finish()
	require.NoError(t, err)
	return query
}

// lookupUDP asks the DNS server at port 53 of server, from client c over
// UDP, for the A record of name (query id) and returns it.
func (c *clientNS) lookupUDP(ctx context.Context, t *testing.T, server netip.Addr, id uint16, name string) netip.Addr {
	t.Helper()
	reply, err := c.udpExchange(ctx, netip.AddrPortFrom(server, dnsPort), dnsQuery(t, id, name))
	require.NoError(t, err)
	addr, err := dnsAnswerA(reply, id)
	require.NoError(t, err)
	return addr
}

// lookupTCP asks the DNS server at the other end of conn for the A record
// of name (query id), as DNS over TCP frames it, and returns it.
func lookupTCP(ctx context.Context, t *testing.T, conn net.Conn, id uint16, name string) netip.Addr {
	t.Helper()
	deadline, _ := ctx.Deadline()
	conn.SetDeadline(deadline)
	q := dnsQuery(t, id, name)
	_, err := conn.Write(append([]byte{byte(len(q) >> 8), byte(len(q))}, q...))
	require.NoError(t, err)
	size := make([]byte, 2)
	_, err = io.ReadFull(conn, size)
	require.NoError(t, err)
	reply := make([]byte, int(size[0])<<8|int(size[1]))
	_, err = io.ReadFull(conn, reply)
	require.NoError(t, err)
	addr, err := dnsAnswerA(reply, id)
	require.NoError(t, err)
	return addr
}

// dnsAnswerA reads the A record of a reply to query id.
func dnsAnswerA(reply []byte, id uint16) (netip.Addr, error) {
	var p dnsmessage.Parser
	h, err := p.Start(reply)
	if err != nil {
		return netip.Addr{}, err
	}
	if h.ID != id || !h.Response {
		return netip.Addr{}, errors.New("reply does not answer the query")
	}
	if err := p.SkipAllQuestions(); err != nil {
		return netip.Addr{}, err
	}
	answers, err := p.AllAnswers()
	if err != nil {
		return netip.Addr{}, err
	}
	for _, a := range answers {
		if r, ok := a.Body.(*dnsmessage.AResource); ok {
			return netip.AddrFrom4(r.A), nil
		}
	}
	return netip.Addr{}, errors.New("reply has no A record: " + h.RCode.String())
}
