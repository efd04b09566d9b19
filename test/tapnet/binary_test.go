package tapnet_test

import (
	"bufio"
	"context"
	"encoding/json"
	"errors"
	"io"
	"net/http"
	"net/netip"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"qfw/test/nstest"
)

// binDir holds the qfw binary built once for all tests of this package.
var binDir string

func TestMain(m *testing.M) {
	code := m.Run()
	if binDir != "" {
		os.RemoveAll(binDir)
	}
	os.Exit(code)
}

var buildOnce struct {
	sync.Once
	path string
	err  error
}

// qfwBinary builds cmd/qfw once. The directory is readable by everyone so
// that the binary can also run as an unprivileged user.
func qfwBinary(t *testing.T) string {
	t.Helper()
	buildOnce.Do(func() {
		binDir, buildOnce.err = os.MkdirTemp("", "qfw-bin-")
		if buildOnce.err != nil {
			return
		}
		if buildOnce.err = os.Chmod(binDir, 0o755); buildOnce.err != nil {
			return
		}
		ctx, cancel := context.WithTimeout(context.Background(), 5*time.Minute)
		defer cancel()
		path := filepath.Join(binDir, "qfw")
		out, err := exec.CommandContext(ctx, "go", "build", "-buildvcs=false", "-o", path, "qfw/cmd/qfw").CombinedOutput()
		if err != nil {
			buildOnce.err = errors.New("go build qfw/cmd/qfw: " + err.Error() + ": " + string(out))
			return
		}
		buildOnce.path = path
	})
	require.NoError(t, buildOnce.err)
	return buildOnce.path
}

// writeQubesDB writes db as the JSON file qfw reads, readable by everyone.
func writeQubesDB(t *testing.T, path string, db map[string]string) {
	t.Helper()
	data, err := json.MarshalIndent(db, "", "  ")
	require.NoError(t, err)
	// Write then rename, as a careful harness would: qfw never sees half a file.
	tmp := path + ".new"
	require.NoError(t, os.WriteFile(tmp, data, 0o644))
	require.NoError(t, os.Rename(tmp, path))
}

// publicDir is a temporary directory that an unprivileged user may read.
func publicDir(t *testing.T) string {
	t.Helper()
	dir := t.TempDir()
	require.NoError(t, os.Chmod(filepath.Dir(dir), 0o755))
	require.NoError(t, os.Chmod(dir, 0o755))
	return dir
}

func TestBinaryRefusesBadInvocations(t *testing.T) {
	bin := qfwBinary(t)
	dir := publicDir(t)
	valid := filepath.Join(dir, "valid.json")
	writeQubesDB(t, valid, (&topology{}).qubesDB())
	malformed := filepath.Join(dir, "malformed.json")
	require.NoError(t, os.WriteFile(malformed, []byte(`{"/qubes-ip": "10.137.0.6",`), 0o644))
	incomplete := filepath.Join(dir, "incomplete.json")
	writeQubesDB(t, incomplete, map[string]string{"/qubes-ip": "10.137.0.6"})
	tap := []string{"-platform", "tap", "-uplink", "qfwtestup", "-client", "qfwtestc=10.137.0.5"}

	cases := map[string]struct {
		args   []string
		status int
		want   string
	}{
		"unknown flag":     {append([]string{"-bogus"}, tap...), 2, "flag provided but not defined: -bogus"},
		"bad client":       {append(tap, "-client", "c9", "-qubesdb", valid), 2, `"c9" is not TAP=IPv4[,IPv6]`},
		"no qubesdb":       {tap, 2, "-qubesdb FILE is required"},
		"stray argument":   {append(tap, "-qubesdb", valid, "extra"), 2, `unexpected argument "extra"`},
		"missing file":     {append(tap, "-qubesdb", filepath.Join(dir, "absent.json")), 1, "absent.json: no such file or directory"},
		"malformed JSON":   {append(tap, "-qubesdb", malformed), 1, "malformed.json: malformed JSON"},
		"missing gateway":  {append(tap, "-qubesdb", incomplete), 1, "/qubes-gateway: missing"},
		"flags after file": {append([]string{"-qubesdb", malformed}, tap...), 1, "malformed JSON"},
	}
	for name, c := range cases {
		t.Run(name, func(t *testing.T) {
			ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
			defer cancel()
			out, err := exec.CommandContext(ctx, bin, c.args...).CombinedOutput()
			assertExit(t, err, c.status)
			assertOneLine(t, string(out), c.want)
		})
	}

	t.Run("no TAP permission", func(t *testing.T) {
		ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
		defer cancel()
		cmd := exec.CommandContext(ctx, bin, append(tap, "-qubesdb", valid)...)
		if os.Geteuid() == 0 {
			// As root, run as nobody: no CAP_NET_ADMIN to create a TAP.
			cmd.SysProcAttr = &syscall.SysProcAttr{Credential: &syscall.Credential{Uid: 65534, Gid: 65534}}
		}
		out, err := cmd.CombinedOutput()
		assertExit(t, err, 1)
		// /dev/net/tun is world-writable on most systems (then TUNSETIFF
		// fails), not on all (then open fails): both name the cause.
		assertOneLine(t, string(out), "tap qfwtestup: ")
		assert.Regexp(t, `(operation not permitted|permission denied) \(creating or attaching a TAP needs CAP_NET_ADMIN`, string(out))
	})
}

func assertExit(t *testing.T, err error, status int) {
	t.Helper()
	var exit *exec.ExitError
	require.True(t, errors.As(err, &exit), "qfw must exit with status %d, got %v", status, err)
	assert.Equal(t, status, exit.ExitCode())
}

func assertOneLine(t *testing.T, out, want string) {
	t.Helper()
	assert.Equal(t, 1, strings.Count(out, "\n"), "one line of error, got:\n%s", out)
	assert.True(t, strings.HasPrefix(out, "qfw: "), "message starts with qfw:, got %q", out)
	assert.Contains(t, out, want)
}

// qfwProcess is qfw running in a namespace, with its log lines as they come.
type qfwProcess struct {
	cmd   *exec.Cmd
	lines chan string
	log   syncBuffer
	ended chan struct{}
}

func startQFW(t *testing.T, ns *nstest.NS, args ...string) *qfwProcess {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), testTimeout)
	p := &qfwProcess{cmd: ns.Command(ctx, qfwBinary(t), args...), lines: make(chan string, 4096), ended: make(chan struct{})}
	stderr, err := p.cmd.StderrPipe()
	require.NoError(t, err)
	require.NoError(t, p.cmd.Start())
	go func() {
		defer close(p.ended)
		s := bufio.NewScanner(stderr)
		for s.Scan() {
			p.log.Write([]byte(s.Text() + "\n"))
			select {
			case p.lines <- s.Text():
			default:
			}
		}
	}()
	t.Cleanup(func() {
		p.cmd.Process.Signal(syscall.SIGTERM)
		<-p.ended
		p.cmd.Wait()
		cancel()
		if t.Failed() {
			t.Logf("qfw log:\n%s", p.log.String())
		}
	})
	return p
}

// waitFor returns the next log line that contains every one of parts.
func (p *qfwProcess) waitFor(t *testing.T, ctx context.Context, parts ...string) {
	t.Helper()
	p.waitForLines(t, ctx, parts)
}

// waitForLines reads log lines until, for each pattern, a line contained
// all of its parts, in any order.
func (p *qfwProcess) waitForLines(t *testing.T, ctx context.Context, patterns ...[]string) {
	t.Helper()
	missing := slices.Clone(patterns)
	for len(missing) > 0 {
		select {
		case line := <-p.lines:
			missing = slices.DeleteFunc(missing, func(parts []string) bool { return containsAll(line, parts) })
		case <-p.ended:
			t.Fatalf("qfw ended before logging %q", missing)
		case <-ctx.Done():
			t.Fatalf("qfw did not log %q in time", missing)
		}
	}
}

func containsAll(s string, parts []string) bool {
	for _, p := range parts {
		if !strings.Contains(s, p) {
			return false
		}
	}
	return true
}

// curl fetches http://addr/ from the client with the real curl; it returns
// curl's output and exit status (7: could not connect).
func (c *clientNS) curl(ctx context.Context, t *testing.T, addr string) (string, int) {
	t.Helper()
	out, err := c.Command(ctx, "curl", "-sS", "--max-time", "20", "http://"+addr+"/").CombinedOutput()
	var exit *exec.ExitError
	if errors.As(err, &exit) {
		return string(out), exit.ExitCode()
	}
	require.NoError(t, err, "running curl")
	return string(out), 0
}

func TestBinaryEndToEnd(t *testing.T) {
	nstest.RequireRoot(t)
	for _, tool := range []string{"curl", "ping", "dig"} {
		if _, err := exec.LookPath(tool); err != nil {
			t.Skipf("needs %s (Debian packages curl, iputils-ping, dnsutils; .ci/run installs them)", tool)
		}
	}
	dual := client5
	dual.ip6 = netip.MustParseAddr("fd09:24ef:4179::a89:5")
	tp := newTopology(t, dual, client7)
	c5, c7 := tp.client("c5"), tp.client("c7")
	ctx := testContext(t)

	db := tp.qubesDB()
	// Only the keys the issue lists: the DNS servers clients are told
	// default to Qubes' 10.139.1.1 and .2.
	delete(db, "/qubes-netvm-primary-dns")
	delete(db, "/qubes-netvm-secondary-dns")
	ruleTree(db, c5.ip4,
		"action=accept proto=tcp dst4="+serverA.String()+"/32 dstports=80-80",
		"action=accept proto=icmp dsthost=b.qfw.test", // resolved through the uplink
		"action=accept specialtarget=dns")
	ruleTree(db, c5.ip6, "action=accept proto=tcp dst6="+serverB6.String()+"/128")
	// c7 has rules but no commit key yet: it stays blocked.
	ruleTree(db, c7.ip4, "action=accept")
	delete(db, "/qubes-firewall/"+c7.ip4.String())
	path := filepath.Join(t.TempDir(), "qubesdb.json")
	writeQubesDB(t, path, db)

	// A harness may make a TAP beforehand: qfw attaches to it.
	made, err := tp.fw.Command(ctx, "ip", "tuntap", "add", "dev", c7.tap, "mode", "tap").CombinedOutput()
	require.NoError(t, err, "ip tuntap add: %s", made)

	p := startQFW(t, tp.fw, "-platform", "tap", "-uplink", uplinkTAP,
		"-client", c5.tap+"="+c5.ip4.String()+","+c5.ip6.String(), "-client", c7.tap+"="+c7.ip4.String(), "-qubesdb", path)
	p.waitFor(t, ctx, "qfw starting", "uplink=up0", "ip=10.137.0.6")
	p.waitFor(t, ctx, "qfw running")
	// The dsthost lookup waits for the uplink to be attached.
	tp.attach(t)
	p.waitForLines(t, ctx,
		[]string{"rules loaded", "client=c5", "ip=10.137.0.5", `result="ok, 3 rules"`},
		[]string{"rules loaded", "client=c5", "ip=fd09:24ef:4179::a89:5", `result="ok, 1 rules"`},
		[]string{"no rules committed", "client=c7"})

	out, status := c5.curl(ctx, t, serverA.String())
	assert.Equal(t, 0, status, "curl serverA: %s", out)
	assert.Equal(t, "server 203.0.113.10\n", out)
	out, status = c5.curl(ctx, t, serverB.String())
	// 7 is "could not connect"; a silent drop would end in 28 (timeout).
	assert.Equal(t, 7, status, "curl serverB must be rejected: %s", out)
	out, status = c7.curl(ctx, t, serverA.String())
	assert.Equal(t, 7, status, "c7 has no committed rules: %s", out)
	out, status = c5.curl(ctx, t, "["+serverB6.String()+"]")
	assert.Equal(t, 0, status, "curl serverB6: %s", out)
	assert.Equal(t, "server 2001:db8::20\n", out)
	out, status = c5.curl(ctx, t, "["+serverA6.String()+"]")
	assert.Equal(t, 7, status, "curl serverA6 must be rejected: %s", out)
	p.waitFor(t, ctx, "flows rejected", "client=c5", "IPv4 policy: 1")
	p.waitFor(t, ctx, "flows rejected", "client=c7", "no rules yet")

	ping, err := c5.Command(ctx, "ping", "-n", "-c", "1", "-W", "10", serverB.String()).CombinedOutput()
	assert.NoError(t, err, "ping b.qfw.test: %s", ping)
	ping, err = c5.Command(ctx, "ping", "-n", "-c", "1", "-W", "10", serverA.String()).CombinedOutput()
	assert.Error(t, err, "ping serverA is not allowed: %s", ping)
	assert.Contains(t, string(ping), "Packet filtered")
	ping, err = c5.Command(ctx, "ping", "-n", "-c", "1", "-W", "10", "-t", "1", serverB.String()).CombinedOutput()
	assert.Error(t, err)
	assert.Contains(t, string(ping), "From 10.137.0.6 icmp_seq=1 Time to live exceeded")

	for _, transport := range []string{"+notcp", "+tcp"} {
		dig, err := c5.Command(ctx, "dig", "@"+dns1.String(), "a.qfw.test", "A", "+short", "+time=5", "+tries=2", transport).CombinedOutput()
		assert.NoError(t, err, "dig %s: %s", transport, dig)
		assert.Equal(t, serverA.String()+"\n", string(dig), "dig %s", transport)
	}

	// A connection open across the edit: HTTP keep-alive to serverA.
	conn, err := c5.dial(ctx, "tcp4", netip.AddrPortFrom(serverA, httpPort))
	require.NoError(t, err)
	defer conn.Close()
	deadline, _ := ctx.Deadline()
	conn.SetDeadline(deadline)
	keepAlive := bufio.NewReader(conn)
	get := func() error {
		if _, err := conn.Write([]byte("GET / HTTP/1.1\r\nHost: a\r\n\r\n")); err != nil {
			return err
		}
		resp, err := http.ReadResponse(keepAlive, nil)
		if err != nil {
			return err
		}
		_, err = io.Copy(io.Discard, resp.Body)
		resp.Body.Close()
		return err
	}
	require.NoError(t, get())

	// A rule edit in the GUI: c5 may now reach serverB only, c7 is committed.
	ruleTree(db, c5.ip4, "action=accept proto=tcp dst4="+serverB.String()+"/32")
	ruleTree(db, c7.ip4, "action=accept proto=tcp dsthost=a.qfw.test dstports=80-80")
	writeQubesDB(t, path, db)
	require.NoError(t, p.cmd.Process.Signal(syscall.SIGHUP))
	p.waitForLines(t, ctx,
		[]string{"rules loaded", "client=c5", "ip=10.137.0.5", `result="ok, 1 rules"`},
		[]string{"rules loaded", "client=c7", `result="ok, 1 rules"`})

	err = get()
	require.Error(t, err, "the open connection to serverA survived rules that forbid it")
	assertReset(t, err)
	out, status = c5.curl(ctx, t, serverA.String())
	assert.Equal(t, 7, status, "after the edit c5 may not reach serverA: %s", out)
	out, status = c5.curl(ctx, t, serverB.String())
	assert.Equal(t, 0, status, "after the edit c5 reaches serverB: %s", out)
	out, status = c7.curl(ctx, t, serverA.String())
	assert.Equal(t, 0, status, "after the edit c7 reaches serverA: %s", out)

	// A broken file on reload is reported and changes nothing; a rule that
	// does not parse blocks its client.
	require.NoError(t, os.WriteFile(path, []byte("{"), 0o644))
	require.NoError(t, p.cmd.Process.Signal(syscall.SIGHUP))
	p.waitFor(t, ctx, "reload failed, rules unchanged", "malformed JSON")
	out, status = c5.curl(ctx, t, serverB.String())
	assert.Equal(t, 0, status, "a broken file must not change the rules: %s", out)

	ruleTree(db, c5.ip4, "action=accept proto=tcp dst4="+serverB.String()+"/32 bogus=1")
	ruleTree(db, c7.ip4, "action=accept proto=tcp dst4="+serverA.String()+"/32", "action=accept dsthost=nx.qfw.test")
	writeQubesDB(t, path, db)
	require.NoError(t, p.cmd.Process.Signal(syscall.SIGHUP))
	p.waitForLines(t, ctx,
		[]string{"rules loaded", "client=c5", "ip=10.137.0.5", `result="blocked: `, "bogus"},
		[]string{"rules loaded", "client=c7", `result="blocked: `, "nx.qfw.test"})
	out, status = c5.curl(ctx, t, serverB.String())
	assert.Equal(t, 7, status, "unparsable rules block the client: %s", out)
	out, status = c7.curl(ctx, t, serverA.String())
	assert.Equal(t, 7, status, "a dsthost that does not resolve blocks the client: %s", out)

	require.NoError(t, p.cmd.Process.Signal(syscall.SIGTERM))
	p.waitFor(t, ctx, "qfw stopped")
	<-p.ended
	assert.NoError(t, p.cmd.Wait(), "qfw exits 0 on SIGTERM")
}
