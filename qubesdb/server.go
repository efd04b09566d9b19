package qubesdb

import (
	"context"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"maps"
	"slices"
	"sync"
	"time"
)

// ServerConfig tunes a Server.
type ServerConfig struct {
	Peer   string       // the VM's name, for logs and errors
	Logger *slog.Logger // nil: slog.Default()
}

// Server is dom0's side of one VM's QubesDB vchan link, for tests and the
// simulated platform. It behaves as the dom0 qubesdb-daemon does: it
// answers the VM's one MULTIREAD with the whole database in descending
// order and a terminator, then forwards every change made with Write and
// Rm, stores the VM's own WRITEs and RMs, and drops the link on anything
// the reference daemon treats as fatal. Where the reference daemon's
// recovery from bad input is accidental (it trusts data_len of RESP_OK, it
// truncates unterminated paths), the Server is stricter and drops the link.
type Server struct {
	db   *DB
	peer string
	log  *slog.Logger

	mu      sync.Mutex
	link    *link         // the link whose peer has synced, nil otherwise
	unacked int           // forwarded commands the VM has not answered yet
	idle    chan struct{} // closed while unacked == 0
}

// lingerTime bounds how long a failing link waits to deliver its last answer.
const lingerTime = time.Second

// NewServer returns a server whose database is db.
func NewServer(db *DB, cfg ServerConfig) *Server {
	s := &Server{db: db, peer: cfg.Peer, log: cfg.Logger, idle: make(chan struct{})}
	close(s.idle)
	if s.peer == "" {
		s.peer = "VM"
	}
	if s.log == nil {
		s.log = slog.Default()
	}
	return s
}

// queueBytes bounds the output to the VM: a whole sync must fit.
func (s *Server) queueBytes() int {
	return s.db.limits.MaxBytes + (s.db.limits.MaxEntries+1)*HeaderLen + clientQueueBytes
}

// Run serves one connection after another, as the dom0 daemon listens
// again when its VM's link closes, until ctx is done or accept fails.
func (s *Server) Run(ctx context.Context, accept Connect) error {
	for {
		rwc, err := accept(ctx)
		if err != nil {
			if ctx.Err() != nil {
				return ctx.Err()
			}
			return fmt.Errorf("waiting for %s: %w", s.peer, err)
		}
		err = s.Serve(ctx, rwc)
		if ctx.Err() != nil {
			return ctx.Err()
		}
		s.log.Warn("qubesdb: link closed, listening again", "vm", s.peer, "err", err)
	}
}

// Serve runs one connection until it fails, the VM breaks the protocol, or
// ctx is done.
func (s *Server) Serve(ctx context.Context, rwc io.ReadWriteCloser) (err error) {
	l := newLink(rwc, s.peer, s.queueBytes())
	stop := context.AfterFunc(ctx, func() { l.close(ctx.Err()) })
	defer func() {
		stop()
		s.detach(l)
		l.closeAfterFlush(err, lingerTime)
		err = l.reason(err)
	}()
	for {
		m, err := l.recv()
		if err != nil {
			return err
		}
		if err := s.handle(l, m); err != nil {
			return err
		}
	}
}

// handle processes one message from the VM.
func (s *Server) handle(l *link, m Message) error {
	// The reference daemon checks the header first (fatal without an
	// answer), then answers RESP_ERROR to a NUL in a WRITE's value and to
	// an RM with data, and keeps the link; a WRITE it cannot store gets
	// RESP_ERROR and is fatal.
	if m.Type == CmdWrite && CheckPath(m.Path) == nil {
		if err := CheckKey(m.Path); err != nil {
			_ = l.send(RespError, m.Path, nil)
			return fmt.Errorf("from %s: WRITE: %w", s.peer, err)
		}
		if CheckValue(m.Data) != nil {
			s.log.Warn("qubesdb: VM wrote a value with NUL", "vm", s.peer, "path", m.Path)
			return l.send(RespError, m.Path, nil)
		}
	}
	if m.Type == CmdRm && CheckRmPath(m.Path) == nil && len(m.Data) > 0 {
		s.log.Warn("qubesdb: VM sent RM with data", "vm", s.peer, "path", m.Path)
		return l.send(RespError, m.Path, nil)
	}
	if err := CheckVchan(m); err != nil {
		return fmt.Errorf("from %s: %w", s.peer, err)
	}
	switch m.Type {
	case CmdMultiread:
		return s.sync(l, m.Path)
	case CmdWrite:
		if err := s.db.Write(m.Path, string(m.Data)); err != nil {
			_ = l.send(RespError, m.Path, nil)
			return fmt.Errorf("storing WRITE from %s: %w", s.peer, err)
		}
		return l.send(RespOK, m.Path, nil)
	case CmdRm:
		if removed, _ := s.db.Rm(m.Path); !removed {
			_ = l.send(RespErrorNoent, m.Path, nil)
			return fmt.Errorf("%w: %s removed %q, which does not exist: the databases diverged", ErrInvalid, s.peer, m.Path)
		}
		return l.send(RespOK, m.Path, nil)
	case RespOK, RespError:
		if m.Type == RespError {
			s.log.Warn("qubesdb: VM refused a forwarded command", "vm", s.peer, "path", m.Path)
		}
		s.acked(l)
		return nil
	default: // RESP_MULTIREAD
		return fmt.Errorf("%w: %s sent %v, but dom0 never asks for a sync", ErrInvalid, s.peer, m)
	}
}

// sync answers the VM's MULTIREAD and starts forwarding changes to it.
// Holding s.mu keeps Write and Rm out between the snapshot and the switch.
func (s *Server) sync(l *link, prefix string) error {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.link == l {
		return fmt.Errorf("%w: %s sent a second MULTIREAD on one connection", ErrInvalid, s.peer)
	}
	entries := s.db.Multiread(prefix)
	if prefix == "" {
		// The whole database goes in descending order: a firewall subtree
		// before its commit key.
		slices.Reverse(entries)
	}
	for _, e := range entries {
		if err := l.send(RespMultiread, e.Path, []byte(e.Value)); err != nil {
			return err
		}
	}
	if err := l.send(RespMultiread, "", nil); err != nil {
		return err
	}
	s.link = l
	return nil
}

// acked counts one answer of the VM to a forwarded command.
func (s *Server) acked(l *link) {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.link != l || s.unacked == 0 {
		s.log.Warn("qubesdb: answer from VM with no command outstanding", "vm", s.peer)
		return
	}
	s.unacked--
	if s.unacked == 0 {
		close(s.idle)
	}
}

// detach stops forwarding to a link that is going away.
func (s *Server) detach(l *link) {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.link != l {
		return
	}
	s.link = nil
	if s.unacked > 0 {
		// Flush callers still hold the open channel and see the link close.
		s.unacked = 0
		s.idle = make(chan struct{})
		close(s.idle)
	}
}

// forward sends a change to the synced VM; s.mu is held.
func (s *Server) forward(t MsgType, path string, data []byte) {
	if s.link == nil {
		return
	}
	if err := s.link.send(t, path, data); err != nil {
		s.link.close(err)
		return
	}
	if s.unacked == 0 {
		s.idle = make(chan struct{})
	}
	s.unacked++
}

// Write stores an entry, as a dom0 tool writing to the VM's database does,
// and forwards it to the VM if it has synced.
func (s *Server) Write(path, value string) error {
	s.mu.Lock()
	defer s.mu.Unlock()
	if err := s.db.Write(path, value); err != nil {
		return err
	}
	s.forward(CmdWrite, path, []byte(value))
	return nil
}

// Rm removes path, or the subtree if it ends with '/', and forwards the RM
// if something was removed; otherwise it returns ErrNotFound.
func (s *Server) Rm(path string) error {
	s.mu.Lock()
	defer s.mu.Unlock()
	removed, err := s.db.Rm(path)
	if err != nil {
		return err
	}
	if !removed {
		return fmt.Errorf("rm %q: %w", path, ErrNotFound)
	}
	s.forward(CmdRm, path, nil)
	return nil
}

// ScriptRuleEdit replaces the firewall rules of one client the way qubesd
// does (spec qubes.md 3.1): RM of the subtree /qubes-firewall/<ip>/, WRITE
// of policy and of every rule key in ascending order, then the empty WRITE
// of the commit key /qubes-firewall/<ip>. rules maps keys such as "0000" to
// rule text; keys may have gaps.
func (s *Server) ScriptRuleEdit(clientIP, policy string, rules map[string]string) error {
	commit := FirewallCommitPath(clientIP)
	if _, ok := FirewallCommitIP(commit); !ok {
		return fmt.Errorf("%w: client address %q", ErrInvalid, clientIP)
	}
	if err := CheckKey(commit); err != nil {
		return err
	}
	if err := s.Rm(commit + "/"); err != nil && !errors.Is(err, ErrNotFound) {
		return err
	}
	if err := s.Write(commit+"/policy", policy); err != nil {
		return err
	}
	for _, k := range slices.Sorted(maps.Keys(rules)) {
		if err := s.Write(commit+"/"+k, rules[k]); err != nil {
			return err
		}
	}
	return s.Write(commit, "")
}

// Flush waits until the VM has answered every change forwarded so far, so
// that a test knows the VM's mirror holds them.
func (s *Server) Flush(ctx context.Context) error {
	s.mu.Lock()
	l, idle := s.link, s.idle
	s.mu.Unlock()
	if l == nil {
		return fmt.Errorf("flush: %s: %w", s.peer, ErrNotConnected)
	}
	select {
	case <-idle:
		return nil
	case <-l.done:
		return fmt.Errorf("flush: link to %s closed: %w", s.peer, l.reason(ErrNotConnected))
	case <-ctx.Done():
		return ctx.Err()
	}
}
