package tap_test

import (
	"context"
	"errors"
	"net"
	"net/netip"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
	"github.com/vishvananda/netlink"
	"gvisor.dev/gvisor/pkg/tcpip"
	"gvisor.dev/gvisor/pkg/tcpip/header"

	"qfw/firewall"
	"qfw/firewall/tap"
	"qfw/test/nstest"
)

// The engine takes a Device as a link.
var _ firewall.Link = (*tap.Device)(nil)

var (
	engineMAC = net.HardwareAddr{0x02, 0, 0, 0, 0, 0x02}
	kernelIP  = netip.MustParseAddr("192.0.2.1")
	engineIP  = netip.MustParseAddr("192.0.2.2")
)

// openInNS opens (creating) a TAP inside a fresh namespace and gives its
// kernel side kernelIP, with engineIP resolved to engineMAC.
func openInNS(t *testing.T, name string) (*nstest.NS, *tap.Device) {
	t.Helper()
	ns := nstest.New(t, "tap")
	var dev *tap.Device
	require.NoError(t, ns.Do(func() (err error) {
		dev, err = tap.Open(name, engineMAC)
		return err
	}))
	t.Cleanup(func() { dev.Close() })

	link, err := ns.Netlink.LinkByName(name)
	require.NoError(t, err)
	require.NoError(t, ns.Netlink.AddrAdd(link, &netlink.Addr{IPNet: prefix(kernelIP, 24)}))
	require.NoError(t, ns.Netlink.NeighAdd(&netlink.Neigh{
		LinkIndex: link.Attrs().Index, State: netlink.NUD_PERMANENT,
		IP: engineIP.AsSlice(), HardwareAddr: engineMAC,
	}))
	require.NoError(t, ns.Netlink.LinkSetUp(link))
	return ns, dev
}

func prefix(a netip.Addr, bits int) *net.IPNet {
	return &net.IPNet{IP: a.AsSlice(), Mask: net.CIDRMask(bits, a.BitLen())}
}

// sendToEngine sends count datagrams of payload from the kernel side of
// ns to engineIP:port.
func sendToEngine(t *testing.T, ns *nstest.NS, port uint16, payload string, count int) {
	t.Helper()
	require.NoError(t, ns.Do(func() error {
		c, err := net.Dial("udp", netip.AddrPortFrom(engineIP, port).String())
		if err != nil {
			return err
		}
		defer c.Close()
		for range count {
			if _, err := c.Write([]byte(payload)); err != nil {
				return err
			}
		}
		return nil
	}))
}

// listenInKernel is a UDP socket in ns at kernelIP:9999, where udpFrame
// sends, closed when the test ends.
func listenInKernel(t *testing.T, ns *nstest.NS) *net.UDPConn {
	t.Helper()
	var sock *net.UDPConn
	require.NoError(t, ns.Do(func() (err error) {
		sock, err = net.ListenUDP("udp", net.UDPAddrFromAddrPort(netip.AddrPortFrom(kernelIP, 9999)))
		return err
	}))
	t.Cleanup(func() { sock.Close() })
	return sock
}

// readBuffers are a batch of buffers for dev.Read.
func readBuffers(dev *tap.Device) (bufs [][]byte, sizes []int) {
	bufs = make([][]byte, dev.BatchSize())
	for i := range bufs {
		bufs[i] = make([]byte, 2048)
	}
	return bufs, make([]int, len(bufs))
}

// readFrames reads until want frames arrived or the context ends.
func readFrames(ctx context.Context, t *testing.T, dev *tap.Device, want func([]byte) bool) []byte {
	t.Helper()
	type result struct {
		frame []byte
		err   error
	}
	got := make(chan result, 1)
	go func() {
		bufs, sizes := readBuffers(dev)
		for {
			n, err := dev.Read(bufs, sizes)
			if err != nil {
				got <- result{err: err}
				return
			}
			for i := range n {
				if want(bufs[i][:sizes[i]]) {
					got <- result{frame: append([]byte(nil), bufs[i][:sizes[i]]...)}
					return
				}
			}
		}
	}()
	select {
	case r := <-got:
		require.NoError(t, r.err)
		return r.frame
	case <-ctx.Done():
		dev.Close() // ends the reader
		t.Fatal("no matching frame from the kernel before the deadline")
		return nil
	}
}

func isUDPTo(port uint16) func([]byte) bool {
	return func(f []byte) bool {
		if len(f) < header.EthernetMinimumSize+header.IPv4MinimumSize+header.UDPMinimumSize {
			return false
		}
		if header.Ethernet(f).Type() != header.IPv4ProtocolNumber {
			return false
		}
		ip := header.IPv4(f[header.EthernetMinimumSize:])
		if !ip.IsValid(len(ip)) || ip.TransportProtocol() != header.UDPProtocolNumber {
			return false
		}
		return header.UDP(ip.Payload()).DestinationPort() == port
	}
}

func TestKernelFrameIsRead(t *testing.T) {
	ns, dev := openInNS(t, "qtap0")
	assert.Equal(t, "qtap0", dev.Name())
	assert.Equal(t, 1500, dev.MTU())
	assert.Equal(t, engineMAC, dev.MAC())
	assert.Len(t, dev.KernelMAC(), 6)

	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	sendToEngine(t, ns, 7777, "hello tap", 1)
	f := readFrames(ctx, t, dev, isUDPTo(7777))
	eth := header.Ethernet(f)
	assert.Equal(t, tcpip.LinkAddress(engineMAC), eth.DestinationAddress())
	assert.Equal(t, tcpip.LinkAddress(dev.KernelMAC()), eth.SourceAddress())
	ip := header.IPv4(f[header.EthernetMinimumSize:])
	assert.Equal(t, tcpip.AddrFrom4(kernelIP.As4()), ip.SourceAddress())
	assert.Equal(t, "hello tap", string(header.UDP(ip.Payload()).Payload()))
}

func TestWrittenFrameReachesKernel(t *testing.T) {
	ns, dev := openInNS(t, "qtap1")
	sock := listenInKernel(t, ns)

	n, err := dev.Write([][]byte{udpFrame(dev, "first"), udpFrame(dev, "second")})
	require.NoError(t, err)
	assert.Equal(t, 2, n)

	require.NoError(t, sock.SetReadDeadline(time.Now().Add(10*time.Second)))
	buf := make([]byte, 100)
	for _, want := range []string{"first", "second"} {
		m, from, err := sock.ReadFromUDPAddrPort(buf)
		require.NoError(t, err, "datagram %q written to the TAP never arrived", want)
		assert.Equal(t, want, string(buf[:m]))
		assert.Equal(t, netip.AddrPortFrom(engineIP, 5555), from)
	}
}

// udpFrame is a UDP datagram from engineIP:5555 to kernelIP:9999.
func udpFrame(dev *tap.Device, payload string) []byte {
	f := make([]byte, header.EthernetMinimumSize+header.IPv4MinimumSize+header.UDPMinimumSize+len(payload))
	header.Ethernet(f).Encode(&header.EthernetFields{
		SrcAddr: tcpip.LinkAddress(dev.MAC()), DstAddr: tcpip.LinkAddress(dev.KernelMAC()),
		Type: header.IPv4ProtocolNumber,
	})
	ip := header.IPv4(f[header.EthernetMinimumSize:])
	ip.Encode(&header.IPv4Fields{
		TotalLength: uint16(len(ip)), TTL: 64, Protocol: uint8(header.UDPProtocolNumber),
		SrcAddr: tcpip.AddrFrom4(engineIP.As4()), DstAddr: tcpip.AddrFrom4(kernelIP.As4()),
	})
	ip.SetChecksum(^ip.CalculateChecksum())
	udp := header.UDP(ip.Payload())
	udp.Encode(&header.UDPFields{SrcPort: 5555, DstPort: 9999, Length: uint16(len(udp))})
	copy(udp.Payload(), payload) // checksum 0: none, allowed over IPv4
	return f
}

func TestReadBatchesQueuedFrames(t *testing.T) {
	ns, dev := openInNS(t, "qtap2")
	const sent = 20
	sendToEngine(t, ns, 7000, "x", sent)
	// The datagrams are queued on the TAP before the first Read, so Read
	// must hand out several per call.
	bufs, sizes := readBuffers(dev)
	timer := time.AfterFunc(10*time.Second, func() { dev.Close() })
	defer timer.Stop()
	udp, largest := 0, 0
	for udp < sent {
		n, err := dev.Read(bufs, sizes)
		require.NoError(t, err, "only %d of %d datagrams read before the deadline", udp, sent)
		largest = max(largest, n)
		for i := range n {
			if isUDPTo(7000)(bufs[i][:sizes[i]]) {
				udp++
			}
		}
	}
	assert.Equal(t, sent, udp)
	assert.Greater(t, largest, 1, "every Read returned a single frame")
}

func TestCloseUnblocksRead(t *testing.T) {
	_, dev := openInNS(t, "qtap3")
	done := make(chan error, 1)
	go func() {
		_, err := dev.Read([][]byte{make([]byte, 2048)}, []int{0})
		done <- err
	}()
	require.NoError(t, dev.Close())
	select {
	case err := <-done:
		assert.True(t, errors.Is(err, net.ErrClosed), "Read after Close: %v", err)
	case <-time.After(10 * time.Second):
		t.Fatal("Read still blocked after Close")
	}
}

func TestOpenAttachesToPersistentTAP(t *testing.T) {
	ns := nstest.New(t, "tap")
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	out, err := ns.Command(ctx, "ip", "tuntap", "add", "dev", "qtap4", "mode", "tap").CombinedOutput()
	require.NoError(t, err, "ip tuntap add: %s", out)
	link, err := ns.Netlink.LinkByName("qtap4")
	require.NoError(t, err)

	var dev *tap.Device
	require.NoError(t, ns.Do(func() (err error) {
		dev, err = tap.Open("qtap4", engineMAC)
		return err
	}))
	defer dev.Close()
	assert.Equal(t, link.Attrs().HardwareAddr, dev.KernelMAC())
}

func TestOpenErrorsNameWhatFailed(t *testing.T) {
	ns := nstest.New(t, "tap")
	cases := map[string]struct {
		name, want string
		mac        net.HardwareAddr
	}{
		"empty name":  {name: "", want: "interface name", mac: engineMAC},
		"long name":   {name: "abcdefghijklmnop", want: "interface name", mac: engineMAC},
		"slash":       {name: "a/b", want: "interface name", mac: engineMAC},
		"bad MAC":     {name: "qtap5", want: "6-byte", mac: net.HardwareAddr{1, 2}},
		"loopback":    {name: "lo", want: "not a TAP"},
		"TUN not TAP": {name: "qtun", want: "tap qtun: attach"},
	}
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	out, err := ns.Command(ctx, "ip", "tuntap", "add", "dev", "qtun", "mode", "tun").CombinedOutput()
	require.NoError(t, err, "ip tuntap add: %s", out)
	for what, c := range cases {
		t.Run(what, func(t *testing.T) {
			mac := c.mac
			if mac == nil {
				mac = engineMAC
			}
			err := ns.Do(func() error {
				dev, err := tap.Open(c.name, mac)
				if err == nil {
					dev.Close()
				}
				return err
			})
			require.Error(t, err)
			assert.Contains(t, err.Error(), c.want)
		})
	}
}

func TestWriteFollowsKernelMACChange(t *testing.T) {
	ns, dev := openInNS(t, "qtap6")
	opened := dev.KernelMAC()
	qubesMAC := net.HardwareAddr{0x00, 0x16, 0x3e, 0x5e, 0x6c, 0x00}
	link, err := ns.Netlink.LinkByName("qtap6")
	require.NoError(t, err)
	require.NoError(t, ns.Netlink.LinkSetHardwareAddr(link, qubesMAC))

	sock := listenInKernel(t, ns)
	// The kernel speaks first (as a client does): its frames show the new
	// MAC. A new MAC flushes the neighbours, so it asks for engineIP first.
	_, err = sock.WriteToUDPAddrPort([]byte("hello"), netip.AddrPortFrom(engineIP, 7777))
	require.NoError(t, err)
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	f := readFrames(ctx, t, dev, func(f []byte) bool {
		return len(f) >= header.EthernetMinimumSize && header.Ethernet(f).Type() == header.ARPProtocolNumber
	})
	assert.Equal(t, tcpip.LinkAddress(qubesMAC), header.Ethernet(f).SourceAddress())
	assert.Equal(t, opened, dev.KernelMAC(), "KernelMAC stays what the engine was told")

	frame := udpFrame(dev, "to the old MAC")
	original := append([]byte(nil), frame...)
	_, err = dev.Write([][]byte{frame})
	require.NoError(t, err)
	assert.Equal(t, original, frame, "the caller's frame is not modified")
	require.NoError(t, sock.SetReadDeadline(time.Now().Add(10*time.Second)))
	buf := make([]byte, 100)
	m, err := sock.Read(buf)
	require.NoError(t, err, "a frame for the old MAC must reach the renamed interface")
	assert.Equal(t, "to the old MAC", string(buf[:m]))
}
