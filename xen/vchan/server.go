package vchan

import (
	"context"
	"encoding/binary"
	"errors"
	"fmt"
	"strconv"
	"time"

	"qfw/xen"
	"qfw/xen/xenstore"
)

// cleanupTimeout bounds the xenstore clean-up Close does on its own.
const cleanupTimeout = 10 * time.Second

// basePath is the rendezvous directory of a server, relative to its home.
func basePath(client xen.DomID, port int) string {
	return "data/vchan/" + strconv.Itoa(int(client)) + "/" + strconv.Itoa(port)
}

// Listen starts a server for domain client on port, with rings of at least
// readMin bytes (client to server) and writeMin bytes (server to client),
// and publishes it in xenstore (data/vchan/<client>/<port>, readable by the
// client only). It returns at once; Read waits for the client's data, and
// Write may fill the ring before the client connects. Once the client is
// connected the xenstore entries are removed.
func Listen(ctx context.Context, d xen.Domain, client xen.DomID, port int, readMin, writeMin int) (c *Conn, err error) {
	switch {
	case client == d.ID():
		return nil, fmt.Errorf("vchan: dom%d cannot listen for itself", client)
	case port < 0:
		return nil, fmt.Errorf("vchan: bad port %d", port)
	case readMin < 0 || writeMin < 0 || readMin > MaxRingSize || writeMin > MaxRingSize:
		return nil, fmt.Errorf("vchan: ring sizes %d/%d outside 0..%d", readMin, writeMin, MaxRingSize)
	}
	lo, ro := ringOrders(readMin, writeMin)

	var mem []xen.Pages
	var ev xen.EventChannel
	defer func() {
		if err != nil {
			releaseSetup(mem, ev)
		}
	}()
	fail := func(what string, err error) error {
		return fmt.Errorf("vchan: listen for dom%d port %d: %s: %w", client, port, what, err)
	}

	if ev, err = d.Events().AllocUnbound(client); err != nil {
		return nil, fail("event channel", err)
	}
	ctrlShare, err := d.Grants().Share(client, 1, true)
	if err != nil {
		return nil, fail("control page", err)
	}
	mem = append(mem, ctrlShare)
	ctrl := ctrlShare.Pages()[0]
	if err = ctrlShare.NotifyOnClose(offSrvLive, ev.Port()); err != nil {
		return nil, fail("control page", err)
	}

	var rings [2][][]byte
	slot := offGrants
	for i, order := range []int{lo, ro} {
		n := ringPages(order)
		if n == 0 {
			continue
		}
		s, err := d.Grants().Share(client, n, true)
		if err != nil {
			return nil, fail("ring pages", err)
		}
		mem = append(mem, s)
		rings[i] = s.Pages()
		for _, ref := range s.Refs() {
			binary.LittleEndian.PutUint32(ctrl[slot:], uint32(ref))
			slot += 4
		}
	}
	binary.LittleEndian.PutUint16(ctrl[offLeftOrder:], uint16(lo))
	binary.LittleEndian.PutUint16(ctrl[offRightOrder:], uint16(ro))
	xen.Word(ctrl, offFlags).Store(liveWaiting | liveConnected<<8 | notifyWrite<<16)

	c = newConn(client, true, ctrl, mem, ev, lo, ro, rings[0], rings[1])
	srv := &rendezvous{xs: d.Store(), self: d.ID(), client: client, port: port}
	if err = srv.publish(ctx, ctrlShare.Refs()[0], ev.Port()); err != nil {
		return nil, fail("publish", err)
	}
	c.onEvent = func() {
		if xen.LoadByte(ctrl, offCliLive) != liveWaiting {
			srv.unpublish(c.ctx) // on failure, Close tries again
		}
	}
	c.onClose = func() error {
		ctx, cancel := context.WithTimeout(context.Background(), cleanupTimeout)
		defer cancel()
		return srv.unpublish(ctx)
	}
	c.start()
	return c, nil
}

// rendezvous is a server's xenstore entry.
type rendezvous struct {
	xs     *xenstore.Client
	self   xen.DomID
	client xen.DomID
	port   int
	gone   bool // unpublished; only the event loop, then Close, touch it
}

func (r *rendezvous) publish(ctx context.Context, ref xen.GrantRef, port xen.Port) error {
	base := basePath(r.client, r.port)
	perms := []xenstore.Perm{{Dom: r.self, Access: xenstore.AccessNone}, {Dom: r.client, Access: xenstore.AccessRead}}
	return r.xs.Transaction(ctx, func(tx *xenstore.Tx) error {
		for _, kv := range [][2]string{
			{base + "/ring-ref", strconv.FormatUint(uint64(ref), 10)},
			{base + "/event-channel", strconv.FormatUint(uint64(port), 10)},
		} {
			if err := tx.Write(ctx, kv[0], []byte(kv[1])); err != nil {
				return err
			}
			if err := tx.SetPerms(ctx, kv[0], perms...); err != nil {
				return err
			}
		}
		return nil
	})
}

// unpublish removes the entry, and data/vchan/<client> if that empties it.
func (r *rendezvous) unpublish(ctx context.Context) error {
	if r.gone {
		return nil
	}
	dir := "data/vchan/" + strconv.Itoa(int(r.client))
	err := r.xs.Transaction(ctx, func(tx *xenstore.Tx) error {
		// ENOENT: the parent is gone too, e.g. an earlier attempt committed
		// but was cancelled before its reply came back.
		if err := tx.Rm(ctx, basePath(r.client, r.port)); errors.Is(err, xenstore.ENOENT) {
			return nil
		} else if err != nil {
			return err
		}
		names, err := tx.Directory(ctx, dir)
		if errors.Is(err, xenstore.ENOENT) || err == nil && len(names) > 0 {
			return nil
		}
		if err != nil {
			return err
		}
		return tx.Rm(ctx, dir)
	})
	if err == nil {
		r.gone = true
	}
	return err
}
