package main

import (
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
)

func writeFile(t *testing.T, content string) string {
	t.Helper()
	path := filepath.Join(t.TempDir(), "qubesdb.json")
	require.NoError(t, os.WriteFile(path, []byte(content), 0o600))
	return path
}

func TestReadQubesDBFile(t *testing.T) {
	db, err := readQubesDBFile(writeFile(t, `{
		"/qubes-ip": "10.137.0.6",
		"/qubes-firewall/10.137.0.5": "",
		"/qubes-firewall/10.137.0.5/0000": "action=accept proto=tcp dstports=80-80"
	}`))
	require.NoError(t, err)
	assert.Equal(t, map[string]string{
		"/qubes-ip":                       "10.137.0.6",
		"/qubes-firewall/10.137.0.5":      "",
		"/qubes-firewall/10.137.0.5/0000": "action=accept proto=tcp dstports=80-80",
	}, db)
}

func TestReadQubesDBFileErrors(t *testing.T) {
	cases := map[string]struct{ content, want string }{
		"empty":            {"", "unexpected end of file"},
		"array":            {`["/qubes-ip"]`, "must be a JSON object"},
		"number value":     {`{"/qubes-ip": 10}`, `value of "/qubes-ip" must be a string`},
		"object value":     {`{"/qubes-ip": {}}`, `value of "/qubes-ip" must be a string`},
		"duplicate":        {`{"/qubes-ip": "a", "/qubes-ip": "b"}`, `"/qubes-ip" given twice`},
		"relative path":    {`{"qubes-ip": "a"}`, `path "qubes-ip"`},
		"path too long":    {`{"/` + strings.Repeat("a", 70) + `": ""}`, "path"},
		"NUL in value":     {`{"/qubes-ip": "a\u0000b"}`, `value of "/qubes-ip"`},
		"value too long":   {`{"/x": "` + strings.Repeat("a", 4000) + `"}`, `value of "/x"`},
		"truncated":        {`{"/qubes-ip": "10.137`, "malformed JSON"},
		"missing brace":    {`{"/qubes-ip": "a"`, "unexpected end of file"},
		"trailing data":    {`{"/a": "b"} {}`, "data after the JSON object"},
		"syntax error":     {`{"/a" "b"}`, "malformed JSON at byte"},
		"trailing garbage": {`{"/a": "b"} x`, "malformed JSON"},
	}
	for name, c := range cases {
		t.Run(name, func(t *testing.T) {
			path := writeFile(t, c.content)
			_, err := readQubesDBFile(path)
			require.Error(t, err)
			assert.Contains(t, err.Error(), c.want)
			assert.Contains(t, err.Error(), path, "the message names the file")
		})
	}
}

func TestReadQubesDBFileTooLarge(t *testing.T) {
	path := writeFile(t, `{"/a": "`+strings.Repeat("a", maxQubesDBFileSize)+`"}`)
	_, err := readQubesDBFile(path)
	require.Error(t, err)
	assert.Contains(t, err.Error(), "larger than")
}

func TestReadQubesDBFileMissing(t *testing.T) {
	path := filepath.Join(t.TempDir(), "absent.json")
	_, err := readQubesDBFile(path)
	require.Error(t, err)
	assert.Contains(t, err.Error(), path)
	assert.Contains(t, err.Error(), "no such file")
}
