package vchan

import (
	"context"
	"encoding/binary"
	"errors"
	"fmt"
	"strconv"

	"qfw/xen"
	"qfw/xen/xenstore"
)

// Dial connects domain d to the vchan server in domain server on port. It
// waits (watching xenstore) until the server has published itself and
// honours ctx. A privileged d also gives up when the server domain does not
// exist; a guest cannot ask xenstore that, and relies on ctx.
func Dial(ctx context.Context, d xen.Domain, server xen.DomID, port int) (c *Conn, err error) {
	if server == d.ID() {
		return nil, fmt.Errorf("vchan: dom%d cannot connect to itself", server)
	}
	if port < 0 {
		return nil, fmt.Errorf("vchan: bad port %d", port)
	}
	fail := func(what string, err error) error {
		return fmt.Errorf("vchan: dial dom%d port %d: %s: %w", server, port, what, err)
	}
	ref, evPort, err := awaitServer(ctx, d.Store(), d.ID(), server, port)
	if err != nil {
		return nil, fail("rendezvous", err)
	}

	var mem []xen.Pages
	var ev xen.EventChannel
	defer func() {
		if err != nil {
			releaseSetup(mem, ev)
		}
	}()

	if ev, err = d.Events().BindInterdomain(server, evPort); err != nil {
		return nil, fail("event channel", err)
	}
	ctrlMap, err := d.Grants().Map(server, []xen.GrantRef{ref}, true)
	if err != nil {
		return nil, fail("control page", err)
	}
	mem = append(mem, ctrlMap)
	ctrl := ctrlMap.Pages()[0]
	if err = ctrlMap.NotifyOnClose(offCliLive, ev.Port()); err != nil {
		return nil, fail("control page", err)
	}

	// Copy the layout out of the page once, then validate the copy.
	lo, ro := readOrders(ctrl)
	if err = checkOrders(lo, ro); err != nil {
		return nil, fail("control page", err)
	}
	nl, nr := ringPages(lo), ringPages(ro)
	refs := make([]xen.GrantRef, nl+nr)
	for i := range refs {
		refs[i] = xen.GrantRef(binary.LittleEndian.Uint32(ctrl[offGrants+4*i:]))
	}
	var rings [2][][]byte
	// We write LEFT and only read RIGHT, so RIGHT is mapped read-only.
	for i, part := range [][]xen.GrantRef{refs[:nl], refs[nl:]} {
		if len(part) == 0 {
			continue
		}
		m, err := d.Grants().Map(server, part, i == 0)
		if err != nil {
			return nil, fail("ring pages", err)
		}
		mem = append(mem, m)
		rings[i] = m.Pages()
	}

	if xen.LoadByte(ctrl, offSrvLive) != liveConnected {
		return nil, fail("control page", ErrPeerClosed)
	}
	if ok, _ := xen.CompareAndSwapByte(ctrl, offCliLive, liveWaiting, liveConnected); !ok {
		return nil, fail("control page", errors.New("client live flag is not 'waiting': another client, or a hostile server"))
	}
	c = newConn(server, false, ctrl, mem, ev, lo, ro, rings[0], rings[1])
	c.requestNotify(notifyWrite)
	if err = ev.Notify(); err != nil {
		return nil, fail("notify", err)
	}
	c.start()
	return c, nil
}

// awaitServer waits for the server's ring-ref and event-channel, readable
// once the server published them for us.
func awaitServer(ctx context.Context, xs *xenstore.Client, self, server xen.DomID, port int) (xen.GrantRef, xen.Port, error) {
	home, err := xs.GetDomainPath(ctx, server)
	if err != nil {
		return 0, 0, err
	}
	base := home + "/" + basePath(self, port)
	evw, err := xs.Watch(ctx, base+"/event-channel")
	if err != nil {
		return 0, 0, err
	}
	defer closeWatch(ctx, evw)
	rel, err := xs.Watch(ctx, "@releaseDomain")
	if err != nil {
		return 0, 0, err
	}
	defer closeWatch(ctx, rel)

	for {
		ref, rerr := readUint(ctx, xs, base+"/ring-ref")
		port, perr := readUint(ctx, xs, base+"/event-channel")
		if rerr == nil && perr == nil {
			return xen.GrantRef(ref), xen.Port(port), nil
		}
		// Missing or not yet readable: wait. Anything else is fatal. (The
		// two reads are not atomic, so one may succeed and the other not.)
		for _, err := range []error{rerr, perr} {
			if err != nil && !errors.Is(err, xenstore.ENOENT) && !errors.Is(err, xenstore.EACCES) {
				return 0, 0, err
			}
		}
		// Only a privileged domain may ask (xenstored refuses a guest
		// with EACCES); a guest cannot tell and waits, bounded by ctx.
		alive, err := xs.IsDomainIntroduced(ctx, server)
		if err != nil && !errors.Is(err, xenstore.EACCES) {
			return 0, 0, err
		}
		if err == nil && !alive {
			return 0, 0, fmt.Errorf("server dom%d does not exist", server)
		}
		select {
		case _, ok := <-evw.C():
			if !ok {
				return 0, 0, xs.Err()
			}
		case _, ok := <-rel.C():
			if !ok {
				return 0, 0, xs.Err()
			}
		case <-ctx.Done():
			return 0, 0, ctx.Err()
		}
	}
}

// closeWatch removes a watch even when ctx is already done.
func closeWatch(ctx context.Context, w *xenstore.Watch) {
	ctx, cancel := context.WithTimeout(context.WithoutCancel(ctx), cleanupTimeout)
	defer cancel()
	_ = w.Close(ctx) // a watch we fail to remove only costs the server a slot
}

// readUint reads a non-zero decimal uint32 key.
func readUint(ctx context.Context, xs *xenstore.Client, path string) (uint32, error) {
	v, err := xs.Read(ctx, path)
	if err != nil {
		return 0, err
	}
	n, err := strconv.ParseUint(string(v), 10, 32)
	if err != nil || n == 0 {
		return 0, fmt.Errorf("%w: %s = %q", ErrCorrupt, path, v)
	}
	return uint32(n), nil
}

// releaseSetup undoes a connection set-up that failed half way: the pages
// mapped or shared so far (newest first) and the event channel.
func releaseSetup(mem []xen.Pages, ev xen.EventChannel) {
	for i := len(mem) - 1; i >= 0; i-- {
		_ = mem[i].Close() // already failing; the first error says why
	}
	if ev != nil {
		_ = ev.Close()
	}
}
