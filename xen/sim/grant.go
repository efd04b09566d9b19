package sim

import (
	"errors"

	"qfw/xen"
)

// firstGrantRef skips the entries Xen reserves (GNTTAB_NR_RESERVED_ENTRIES).
const firstGrantRef xen.GrantRef = 8

// ErrClosed reports a second Close of shared pages.
var ErrClosed = errors.New("already closed")

// grant is one entry of a domain's grant table.
type grant struct {
	grantee  xen.DomID
	page     []byte
	readonly bool
	maps     int  // live mappings by the grantee
	ending   bool // the granter let go; freed when maps drops to 0
}

// closeNote is a pending "clear byte + send event" (Linux unmap notify).
type closeNote struct {
	set  bool
	page []byte
	off  int
	port xen.Port
}

// fire runs the note on behalf of domain d. Caller holds h.mu.
func (n closeNote) fire(d *Domain) {
	if !n.set {
		return
	}
	xen.StoreByte(n.page, n.off, 0)
	if p := d.ports[n.port]; p != nil {
		p.notifyLocked()
	}
}

func setNote(d *Domain, note *closeNote, pages [][]byte, off int, port xen.Port) error {
	if off < 0 || off >= len(pages)*xen.PageSize {
		return d.errf("notify on close: offset %d outside %d pages", off, len(pages))
	}
	d.h.mu.Lock()
	defer d.h.mu.Unlock()
	if d.ports[port] == nil {
		return d.errf("notify on close: port %d: %w", port, xen.ErrPortClosed)
	}
	*note = closeNote{set: true, page: pages[off/xen.PageSize], off: off % xen.PageSize, port: port}
	return nil
}

// Share allocates count zeroed pages and grants them to peer.
func (d *Domain) Share(peer xen.DomID, count int, writable bool) (xen.Share, error) {
	h := d.h
	if count <= 0 || count > h.lim.Grants {
		return nil, d.errf("share %d pages with dom%d: bad count", count, peer)
	}
	mem := make([]byte, count*xen.PageSize)
	h.mu.Lock()
	defer h.mu.Unlock()
	if !d.alive {
		return nil, d.errf("share: %w", ErrDead)
	}
	if len(d.grants)+count > h.lim.Grants {
		return nil, d.errf("share %d pages with dom%d: %w (%d grants in use)", count, peer, xen.ErrNoMemory, len(d.grants))
	}
	s := &share{d: d, refs: make([]xen.GrantRef, count), pages: make([][]byte, count)}
	for i := range count {
		ref := d.allocRef()
		s.refs[i] = ref
		s.pages[i] = mem[i*xen.PageSize : (i+1)*xen.PageSize : (i+1)*xen.PageSize]
		d.grants[ref] = &grant{grantee: peer, page: s.pages[i], readonly: !writable}
	}
	d.shares[s] = struct{}{}
	return s, nil
}

func (d *Domain) allocRef() xen.GrantRef {
	if n := len(d.freeRefs); n > 0 {
		ref := d.freeRefs[n-1]
		d.freeRefs = d.freeRefs[:n-1]
		return ref
	}
	d.nextRef++
	return d.nextRef - 1
}

// endLocked removes grant ref of d once neither side uses it.
func (d *Domain) endLocked(ref xen.GrantRef, g *grant) {
	if g.ending && g.maps == 0 {
		delete(d.grants, ref)
		d.freeRefs = append(d.freeRefs, ref)
	}
}

type share struct {
	d      *Domain
	refs   []xen.GrantRef
	pages  [][]byte
	note   closeNote
	closed bool // guarded by h.mu
}

func (s *share) Pages() [][]byte      { return s.pages }
func (s *share) Refs() []xen.GrantRef { return s.refs }

func (s *share) NotifyOnClose(off int, port xen.Port) error {
	return setNote(s.d, &s.note, s.pages, off, port)
}

// Close revokes the grants. Xen refuses to end a grant that is still mapped;
// like Linux, the simulator then defers: such a page stays valid for the
// peer, and its grant reference is not reused, until the peer unmaps it.
func (s *share) Close() error {
	s.d.h.mu.Lock()
	defer s.d.h.mu.Unlock()
	if s.closed {
		return s.d.errf("close grants %v: %w", s.refs, ErrClosed)
	}
	s.closeLocked()
	return nil
}

func (s *share) closeLocked() {
	s.closed = true
	s.note.fire(s.d)
	for _, ref := range s.refs {
		g := s.d.grants[ref]
		g.ending = true
		s.d.endLocked(ref, g)
	}
	delete(s.d.shares, s)
}

// Map maps pages that peer granted to d. It fails, mapping nothing, if any
// grant does not exist, is not granted to d, or is read-only while writable
// access is asked for.
func (d *Domain) Map(peer xen.DomID, refs []xen.GrantRef, writable bool) (xen.Mapping, error) {
	h := d.h
	if len(refs) == 0 || len(refs) > h.lim.Mappings {
		return nil, d.errf("map %d grants of dom%d: bad count", len(refs), peer)
	}
	h.mu.Lock()
	defer h.mu.Unlock()
	if !d.alive {
		return nil, d.errf("map: %w", ErrDead)
	}
	g := h.domains[peer]
	if g == nil || !g.alive {
		return nil, d.errf("map grants of dom%d: %w", peer, xen.GrantBadDomain)
	}
	if d.mapped+len(refs) > h.lim.Mappings {
		return nil, d.errf("map %d grants of dom%d: %w (%d pages mapped)", len(refs), peer, xen.ErrNoMemory, d.mapped)
	}
	m := &mapping{d: d, granter: g, refs: append([]xen.GrantRef(nil), refs...), grants: make([]*grant, len(refs)), pages: make([][]byte, len(refs))}
	for i, ref := range refs {
		e := g.grants[ref]
		if st := d.checkAccess(e, writable); st != xen.GrantOkay {
			return nil, d.errf("map grant %d of dom%d: %w", ref, peer, st)
		}
		m.grants[i] = e
		m.pages[i] = e.page
	}
	for _, e := range m.grants {
		e.maps++
	}
	d.mapped += len(refs)
	d.mappings[m] = struct{}{}
	return m, nil
}

// checkAccess applies the hypervisor's rules for d using grant entry e.
func (d *Domain) checkAccess(e *grant, write bool) xen.GrantStatus {
	switch {
	case e == nil || e.ending:
		return xen.GrantBadRef
	case e.grantee != d.id:
		return xen.GrantPermissionDenied
	case write && e.readonly:
		return xen.GrantPermissionDenied
	}
	return xen.GrantOkay
}

type mapping struct {
	d       *Domain
	granter *Domain
	refs    []xen.GrantRef
	grants  []*grant
	pages   [][]byte
	note    closeNote
	closed  bool // guarded by h.mu
}

func (m *mapping) Pages() [][]byte { return m.pages }

func (m *mapping) NotifyOnClose(off int, port xen.Port) error {
	return setNote(m.d, &m.note, m.pages, off, port)
}

// Close unmaps the pages.
func (m *mapping) Close() error {
	m.d.h.mu.Lock()
	defer m.d.h.mu.Unlock()
	if m.closed {
		return m.d.errf("unmap grants %v of dom%d: %w", m.refs, m.granter.id, ErrClosed)
	}
	m.closeLocked()
	return nil
}

func (m *mapping) closeLocked() {
	m.closed = true
	m.note.fire(m.d)
	for i, e := range m.grants {
		e.maps--
		m.granter.endLocked(m.refs[i], e)
	}
	m.d.mapped -= len(m.refs)
	delete(m.d.mappings, m)
}

// Copy runs grant copies between d's buffers and pages granted to d.
func (d *Domain) Copy(ops []xen.CopyOp) error {
	h := d.h
	h.mu.Lock()
	defer h.mu.Unlock()
	if !d.alive {
		return d.errf("grant copy: %w", ErrDead)
	}
	for i := range ops {
		ops[i].Status = d.copyLocked(&ops[i])
	}
	return nil
}

func (d *Domain) copyLocked(op *xen.CopyOp) xen.GrantStatus {
	if op.Offset < 0 || len(op.Buf) > xen.PageSize || op.Offset+len(op.Buf) > xen.PageSize {
		return xen.GrantBadCopyArg
	}
	g := d.h.domains[op.Dom]
	if g == nil || !g.alive {
		return xen.GrantBadDomain
	}
	e := g.grants[op.Ref]
	if st := d.checkAccess(e, op.ToGrant); st != xen.GrantOkay {
		return st
	}
	if op.ToGrant {
		copy(e.page[op.Offset:], op.Buf)
	} else {
		copy(op.Buf, e.page[op.Offset:])
	}
	return xen.GrantOkay
}
