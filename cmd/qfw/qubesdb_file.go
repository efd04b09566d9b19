package main

import (
	"bytes"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"os"

	"qfw/qubesdb"
)

// Bounds on a QubesDB file: well above what dom0 writes for a firewall VM
// (a few dozen keys plus the clients' rules).
const (
	maxQubesDBFileSize = 8 << 20
	maxQubesDBEntries  = 100000
)

// readQubesDBFile reads a JSON object of QubesDB path -> value. Every path
// and value must be one QubesDB could store; a path given twice is an error
// (JSON decoders would silently keep the last).
func readQubesDBFile(path string) (map[string]string, error) {
	f, err := os.Open(path)
	if err != nil {
		return nil, fmt.Errorf("QubesDB file: %w", err)
	}
	defer f.Close()
	data, err := io.ReadAll(io.LimitReader(f, maxQubesDBFileSize+1))
	if err != nil {
		return nil, fmt.Errorf("QubesDB file: %w", err)
	}
	if len(data) > maxQubesDBFileSize {
		return nil, fmt.Errorf("QubesDB file %s: larger than %d bytes", path, maxQubesDBFileSize)
	}
	db, err := decodeQubesDB(bytes.NewReader(data))
	if err != nil {
		return nil, fmt.Errorf("QubesDB file %s: %w", path, err)
	}
	return db, nil
}

func decodeQubesDB(r io.Reader) (map[string]string, error) {
	dec := json.NewDecoder(r)
	if tok, err := dec.Token(); err != nil || tok != json.Delim('{') {
		return nil, jsonError(dec, err, "must be a JSON object of path -> value")
	}
	db := make(map[string]string)
	for dec.More() {
		tok, err := dec.Token()
		if err != nil {
			return nil, jsonError(dec, err, "")
		}
		key := tok.(string) // object keys are always strings
		tok, err = dec.Token()
		if err != nil {
			return nil, jsonError(dec, err, "")
		}
		value, ok := tok.(string)
		if !ok {
			return nil, fmt.Errorf("value of %q must be a string", key)
		}
		if err := qubesdb.CheckKey(key); err != nil {
			return nil, fmt.Errorf("path %q: %w", key, err)
		}
		if err := qubesdb.CheckValue(value); err != nil {
			return nil, fmt.Errorf("value of %q: %w", key, err)
		}
		if _, dup := db[key]; dup {
			return nil, fmt.Errorf("path %q given twice", key)
		}
		if len(db) == maxQubesDBEntries {
			return nil, fmt.Errorf("more than %d entries", maxQubesDBEntries)
		}
		db[key] = value
	}
	if _, err := dec.Token(); err != nil { // the closing brace
		return nil, jsonError(dec, err, "")
	}
	if _, err := dec.Token(); err != io.EOF {
		return nil, jsonError(dec, err, "has data after the JSON object")
	}
	return db, nil
}

// jsonError says what is wrong with the file and where.
func jsonError(dec *json.Decoder, err error, what string) error {
	switch {
	case errors.Is(err, io.EOF) || errors.Is(err, io.ErrUnexpectedEOF):
		return errors.New("malformed JSON: unexpected end of file")
	case err != nil && what != "":
		return fmt.Errorf("%s: malformed JSON at byte %d: %w", what, dec.InputOffset(), err)
	case err != nil:
		return fmt.Errorf("malformed JSON at byte %d: %w", dec.InputOffset(), err)
	}
	return errors.New(what)
}
