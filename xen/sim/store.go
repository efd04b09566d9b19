package sim

import (
	"bytes"
	"errors"
	"net"
	"strconv"
	"strings"
	"sync"

	"qfw/xen"
	"qfw/xen/xenstore"
)

// Special watch paths (xenstore.txt).
const (
	releaseDomain   = "@releaseDomain"
	introduceDomain = "@introduceDomain"
)

// maxTokenLen bounds a watch token.
const maxTokenLen = 256

// store is the simulated xenstored: one tree, one lock, any number of
// connections, each belonging to a domain.
type store struct {
	lim Limits

	mu     sync.Mutex
	main   *tree
	doms   map[xen.DomID]bool
	conns  map[*conn]struct{}
	nextTx uint32
}

func newStore(lim Limits) *store {
	s := &store{
		lim:   lim,
		main:  newTree(lim.StoreNodes),
		doms:  make(map[xen.DomID]bool),
		conns: make(map[*conn]struct{}),
	}
	s.main.changed = s.fire
	return s
}

// conn is the server side of one client connection.
type conn struct {
	s   *store
	dom xen.DomID
	rw  net.Conn

	// Guarded by s.mu.
	watches []watch
	txs     map[uint32]*transaction
	dead    bool
	out     chan []byte // encoded replies and events, drained by the writer
	quit    chan struct{}
}

type watch struct {
	path  string // absolute, or a special @ path
	token string
	rel   bool // registered relative: events are reported relative
}

type transaction struct {
	t   *tree
	log []logged
}

// logged is a transaction request replayed on the main tree at commit.
type logged struct {
	op    xenstore.Op
	path  string
	value []byte
	perms []xenstore.Perm
}

// connect opens a connection for domain d and returns the client side.
func (s *store) connect(d xen.DomID) net.Conn {
	client, server := net.Pipe()
	c := &conn{
		s:    s,
		dom:  d,
		rw:   server,
		txs:  make(map[uint32]*transaction),
		out:  make(chan []byte, s.lim.StoreQueue),
		quit: make(chan struct{}),
	}
	s.mu.Lock()
	s.conns[c] = struct{}{}
	s.mu.Unlock()
	go c.readLoop()
	go c.writeLoop()
	return client
}

func (c *conn) readLoop() {
	buf := make([]byte, xenstore.HeaderLen+xenstore.MaxPayload)
	for {
		m, err := xenstore.ReadMsg(c.rw, buf)
		if err != nil { // EOF, or a violation: xenstored drops such peers
			break
		}
		c.s.mu.Lock()
		c.handle(m)
		dead := c.dead
		c.s.mu.Unlock()
		if dead {
			break
		}
	}
	c.s.mu.Lock()
	c.dropLocked()
	c.s.mu.Unlock()
}

func (c *conn) writeLoop() {
	for {
		select {
		case b := <-c.out:
			if _, err := c.rw.Write(b); err != nil {
				c.s.mu.Lock()
				c.dropLocked()
				c.s.mu.Unlock()
				return
			}
		case <-c.quit:
			return
		}
	}
}

// dropLocked ends the connection: its watches and transactions go with it.
func (c *conn) dropLocked() {
	if c.dead {
		return
	}
	c.dead = true
	delete(c.s.conns, c)
	close(c.quit)
	c.rw.Close()
}

// send queues a message; a peer too slow to drain its queue is dropped.
func (c *conn) sendLocked(op xenstore.Op, reqID, txID uint32, payload []byte) {
	if c.dead {
		return
	}
	b, err := xenstore.AppendMsg(nil, xenstore.Msg{Op: op, ReqID: reqID, TxID: txID, Payload: payload})
	if err != nil { // handle keeps replies in bounds; never send a broken stream
		c.dropLocked()
		return
	}
	select {
	case c.out <- b:
	default:
		c.dropLocked()
	}
}

// canonical resolves a client path to an absolute one and checks it.
func (c *conn) canonical(p string) (string, error) {
	if p == "" {
		return "", xenstore.EINVAL
	}
	if p[0] != '/' {
		if len(p) > xenstore.MaxRelPath {
			return "", xenstore.EINVAL
		}
		p = domainPath(c.dom) + "/" + p
	}
	if len(p) > xenstore.MaxAbsPath || (p != "/" && strings.HasSuffix(p, "/")) || strings.Contains(p, "//") {
		return "", xenstore.EINVAL
	}
	for i := 0; i < len(p); i++ {
		b := p[i]
		if !('a' <= b && b <= 'z' || 'A' <= b && b <= 'Z' || '0' <= b && b <= '9' || strings.IndexByte("-/_@", b) >= 0) {
			return "", xenstore.EINVAL
		}
	}
	return p, nil
}

var okReply = xenstore.AppendStrings(nil, "OK")

// handle serves one request. Caller holds s.mu.
func (c *conn) handle(m xenstore.Msg) {
	reply, err := c.serve(m)
	if err == nil && len(reply) > xenstore.MaxPayload { // a huge directory
		err = xenstore.E2BIG
	}
	if err != nil {
		var errno xenstore.Errno
		if !errors.As(err, &errno) {
			errno = xenstore.EINVAL
		}
		c.sendLocked(xenstore.OpError, m.ReqID, m.TxID, xenstore.AppendStrings(nil, string(errno)))
		return
	}
	c.sendLocked(m.Op, m.ReqID, m.TxID, reply)
	if m.Op == xenstore.OpWatch { // xenstored acks, then fires once
		w := c.watches[len(c.watches)-1]
		c.eventLocked(w, w.path)
	}
}

func (c *conn) serve(m xenstore.Msg) ([]byte, error) {
	switch m.Op {
	case xenstore.OpRead, xenstore.OpDirectory, xenstore.OpGetPerms,
		xenstore.OpWrite, xenstore.OpMkdir, xenstore.OpRm, xenstore.OpSetPerms:
		return c.serveNode(m)
	case xenstore.OpWatch:
		return c.watch(m.Payload)
	case xenstore.OpUnwatch:
		return c.unwatch(m.Payload)
	case xenstore.OpTransactionStart:
		return c.txStart(m)
	case xenstore.OpTransactionEnd:
		return c.txEnd(m)
	case xenstore.OpGetDomainPath, xenstore.OpIsDomainIntroduced:
		if m.Op == xenstore.OpIsDomainIntroduced && c.dom != xen.Dom0 {
			// xenstored flags it privileged (XS_FLAG_PRIV): a guest
			// cannot ask whether another domain exists.
			return nil, xenstore.EACCES
		}
		ss, err := xenstore.Strings(m.Payload)
		if err != nil || len(ss) != 1 {
			return nil, xenstore.EINVAL
		}
		d, err := strconv.ParseUint(ss[0], 10, 16)
		if err != nil {
			return nil, xenstore.EINVAL
		}
		if m.Op == xenstore.OpGetDomainPath {
			return xenstore.AppendStrings(nil, domainPath(xen.DomID(d))), nil
		}
		if c.s.doms[xen.DomID(d)] {
			return xenstore.AppendStrings(nil, "T"), nil
		}
		return xenstore.AppendStrings(nil, "F"), nil
	case xenstore.OpResetWatches:
		c.watches = nil
		return okReply, nil
	case xenstore.OpIntroduce, xenstore.OpRelease, xenstore.OpResume, xenstore.OpSetTarget:
		if c.dom != xen.Dom0 {
			return nil, xenstore.EACCES
		}
	}
	return nil, xenstore.ENOSYS
}

// serveNode decodes a request on a node and runs it.
func (c *conn) serveNode(m xenstore.Msg) ([]byte, error) {
	if m.Op == xenstore.OpWrite { // path\0value, value not terminated
		i := bytes.IndexByte(m.Payload, 0)
		if i < 0 {
			return nil, xenstore.EINVAL
		}
		return c.runNode(m, string(m.Payload[:i]), m.Payload[i+1:], nil)
	}
	ss, err := xenstore.Strings(m.Payload)
	if err != nil || len(ss) == 0 {
		return nil, xenstore.EINVAL
	}
	if m.Op == xenstore.OpSetPerms {
		perms, err := xenstore.ParsePerms(ss[1:])
		if err != nil {
			return nil, xenstore.EINVAL
		}
		return c.runNode(m, ss[0], nil, perms)
	}
	if len(ss) != 1 {
		return nil, xenstore.EINVAL
	}
	return c.runNode(m, ss[0], nil, nil)
}

func (c *conn) runNode(m xenstore.Msg, rawPath string, value []byte, perms []xenstore.Perm) ([]byte, error) {
	path, err := c.canonical(rawPath)
	if err != nil {
		return nil, err
	}
	t := c.s.main
	var tx *transaction
	if m.TxID != 0 {
		if tx = c.txs[m.TxID]; tx == nil {
			return nil, xenstore.ENOENT
		}
		if len(tx.log) >= c.s.lim.StoreTxOps {
			return nil, xenstore.ENOSPC
		}
		t = tx.t
	}
	if value != nil {
		value = append([]byte(nil), value...) // the read buffer is reused
	}
	reply, err := apply(t, c.dom, m.Op, path, value, perms)
	if err == nil && tx != nil && modifies(m.Op) {
		tx.log = append(tx.log, logged{op: m.Op, path: path, value: value, perms: perms})
	}
	return reply, err
}

func modifies(op xenstore.Op) bool {
	return op == xenstore.OpWrite || op == xenstore.OpMkdir || op == xenstore.OpRm || op == xenstore.OpSetPerms
}

// apply runs one node request on t as domain d and encodes its reply.
func apply(t *tree, d xen.DomID, op xenstore.Op, path string, value []byte, perms []xenstore.Perm) ([]byte, error) {
	switch op {
	case xenstore.OpRead:
		v, err := t.read(d, path)
		return append([]byte(nil), v...), err
	case xenstore.OpDirectory:
		names, err := t.directory(d, path)
		return xenstore.AppendStrings(nil, names...), err
	case xenstore.OpGetPerms:
		ps, err := t.getPerms(d, path)
		var b []byte
		for _, p := range ps {
			b = xenstore.AppendStrings(b, p.String())
		}
		return b, err
	case xenstore.OpWrite:
		if value == nil {
			value = []byte{}
		}
		return okReply, t.write(d, path, value)
	case xenstore.OpMkdir:
		return okReply, t.mkdir(d, path)
	case xenstore.OpRm:
		return okReply, t.rm(d, path)
	default: // OpSetPerms
		return okReply, t.setPerms(d, path, perms)
	}
}

func (c *conn) txStart(m xenstore.Msg) ([]byte, error) {
	if m.TxID != 0 {
		return nil, xenstore.EBUSY
	}
	if len(c.txs) >= c.s.lim.StoreTxs {
		return nil, xenstore.ENOSPC
	}
	c.s.nextTx++
	if c.s.nextTx == 0 {
		c.s.nextTx++
	}
	id := c.s.nextTx
	c.txs[id] = &transaction{t: c.s.main.snapshot()}
	return xenstore.AppendStrings(nil, strconv.FormatUint(uint64(id), 10)), nil
}

// txEnd commits ("T") or aborts ("F"). A commit fails with EAGAIN if a path
// the transaction touched changed in the main tree since it first saw it.
func (c *conn) txEnd(m xenstore.Msg) ([]byte, error) {
	tx := c.txs[m.TxID]
	if tx == nil {
		return nil, xenstore.ENOENT
	}
	ss, err := xenstore.Strings(m.Payload)
	if err != nil || len(ss) != 1 || (ss[0] != "T" && ss[0] != "F") {
		return nil, xenstore.EINVAL
	}
	delete(c.txs, m.TxID)
	if ss[0] == "F" {
		return okReply, nil
	}
	for path, g := range tx.t.seen {
		var now uint64
		if n := c.s.main.lookup(path); n != nil {
			now = n.gen
		}
		if now != g {
			return nil, xenstore.EAGAIN
		}
	}
	// Replay on a copy and swap it in, so that a late failure (a quota
	// filled meanwhile through another connection) leaves nothing half done.
	trial := c.s.main.clone()
	var changes []change
	trial.changed = func(ch change) { changes = append(changes, ch) }
	for _, l := range tx.log {
		if _, err := apply(trial, c.dom, l.op, l.path, l.value, l.perms); err != nil {
			return nil, err
		}
	}
	c.s.main.root, c.s.main.owned, c.s.main.gen = trial.root, trial.owned, trial.gen
	for _, ch := range changes {
		c.s.fire(ch)
	}
	return okReply, nil
}

func (c *conn) watch(p []byte) ([]byte, error) {
	ss, err := xenstore.Strings(p)
	if err != nil || len(ss) < 2 || len(ss[1]) > maxTokenLen {
		return nil, xenstore.EINVAL
	}
	w := watch{token: ss[1], rel: ss[0] != "" && ss[0][0] != '/' && ss[0][0] != '@'}
	switch ss[0] {
	case releaseDomain, introduceDomain:
		w.path = ss[0]
	default:
		if w.path, err = c.canonical(ss[0]); err != nil {
			return nil, err
		}
	}
	for _, o := range c.watches {
		if o.path == w.path && o.token == w.token {
			return nil, xenstore.EEXIST
		}
	}
	if len(c.watches) >= c.s.lim.StoreWatches {
		return nil, xenstore.ENOSPC
	}
	c.watches = append(c.watches, w)
	return okReply, nil
}

func (c *conn) unwatch(p []byte) ([]byte, error) {
	ss, err := xenstore.Strings(p)
	if err != nil || len(ss) < 2 {
		return nil, xenstore.EINVAL
	}
	path := ss[0]
	if path != releaseDomain && path != introduceDomain {
		if path, err = c.canonical(path); err != nil {
			return nil, err
		}
	}
	for i, w := range c.watches {
		if w.path == path && w.token == ss[1] {
			c.watches = append(c.watches[:i], c.watches[i+1:]...)
			return okReply, nil
		}
	}
	return nil, xenstore.ENOENT
}

// eventLocked queues a watch event for path (absolute or special).
func (c *conn) eventLocked(w watch, path string) {
	if w.rel {
		path = strings.TrimPrefix(path, domainPath(c.dom)+"/")
	}
	c.sendLocked(xenstore.OpWatchEvent, 0, 0, xenstore.AppendStrings(nil, path, w.token))
}

// fire delivers a change to every watch at or above the path, and for a
// removal also to watches below it, if the watcher may read the node.
func (s *store) fire(ch change) {
	for c := range s.conns {
		for _, w := range c.watches {
			switch {
			case under(ch.path, w.path):
				if ch.node.perm(c.dom).CanRead() {
					c.eventLocked(w, ch.path)
				}
			case ch.removed && under(w.path, ch.path):
				if ch.node.perm(c.dom).CanRead() {
					c.eventLocked(w, w.path)
				}
			}
		}
	}
}

// under reports whether path is top or below it.
func under(path, top string) bool {
	return path == top || top == "/" && path[0] == '/' ||
		len(path) > len(top) && path[len(top)] == '/' && path[:len(top)] == top
}

func (s *store) fireSpecial(path string) {
	for c := range s.conns {
		for _, w := range c.watches {
			if w.path == path {
				c.eventLocked(w, path)
			}
		}
	}
}

// introduce creates a domain's home as libxl does and fires @introduceDomain.
func (s *store) introduce(d xen.DomID, name string) error {
	s.mu.Lock()
	defer s.mu.Unlock()
	home := domainPath(d)
	ro := []xenstore.Perm{{Dom: xen.Dom0, Access: xenstore.AccessNone}, {Dom: d, Access: xenstore.AccessRead}}
	rw := []xenstore.Perm{{Dom: d, Access: xenstore.AccessNone}}
	t := s.main
	if d == xen.Dom0 {
		ro = ro[:1]
	}
	steps := []struct {
		path  string
		value string
		perms []xenstore.Perm
	}{
		{home, "", ro},
		{home + "/domid", strconv.Itoa(int(d)), ro},
		{home + "/name", name, ro},
		{home + "/data", "", rw},
		{home + "/device", "", rw},
		{home + "/control", "", rw},
		{home + "/error", "", rw},
	}
	for _, st := range steps {
		if err := t.write(xen.Dom0, st.path, []byte(st.value)); err != nil {
			return err
		}
		if err := t.setPerms(xen.Dom0, st.path, st.perms); err != nil {
			return err
		}
	}
	s.doms[d] = true
	s.fireSpecial(introduceDomain)
	return nil
}

// release forgets a destroyed domain: its connections close, its home goes,
// and @releaseDomain fires.
func (s *store) release(d xen.DomID) {
	s.mu.Lock()
	defer s.mu.Unlock()
	for c := range s.conns {
		if c.dom == d {
			c.dropLocked()
		}
	}
	delete(s.doms, d)
	// Removing as dom0 cannot fail on a path whose parent exists.
	_ = s.main.rm(xen.Dom0, domainPath(d))
	s.fireSpecial(releaseDomain)
}

func (s *store) close() {
	s.mu.Lock()
	defer s.mu.Unlock()
	for c := range s.conns {
		c.dropLocked()
	}
}
