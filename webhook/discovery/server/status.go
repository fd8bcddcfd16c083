package server

import (
	"sort"
	"sync"
	"time"
)

// Sync states of one resource type of one proxy, as `meshlet proxy-status`
// shows them.
const (
	StateSynced = "SYNCED"
	StateStale  = "STALE"
	StateNACK   = "NACK"
	// StateNotSent: the proxy has not asked for this type (yet).
	StateNotSent = "NOT SENT"
)

// TypeStatus is what one proxy has of one resource type.
type TypeStatus struct {
	// Sent is the version of the last response sent, Acked the last version
	// the proxy accepted.
	Sent  string `json:"sent,omitempty"`
	Acked string `json:"acked,omitempty"`
	// Error is the error_detail of the last NACK of the version sent last.
	Error string `json:"error,omitempty"`
	// State is SYNCED, STALE or NACK.
	State string `json:"state"`
	// SentAt and AckedAt are when those happened.
	SentAt  time.Time `json:"sentAt,omitzero"`
	AckedAt time.Time `json:"ackedAt,omitzero"`
}

// ProxyStatus is one connected proxy.
type ProxyStatus struct {
	ID string `json:"id"`
	// Replica is the control-plane replica serving it.
	Replica   string                 `json:"replica"`
	Delta     bool                   `json:"delta"`
	Generator string                 `json:"generator,omitempty"`
	Connected time.Time              `json:"connected"`
	Types     map[string]*TypeStatus `json:"types"`
}

type typeState struct {
	sent, acked, nackErr string
	nonces               map[string]string // nonce → version, the last few
	sentAt, ackedAt      time.Time
}

// tracker records what each stream was sent and what it acknowledged.
type tracker struct {
	mu      sync.Mutex
	streams map[int64]*streamState
	replica string
	now     func() time.Time
}

type streamState struct {
	node      string
	generator string
	delta     bool
	opened    time.Time
	types     map[string]*typeState
}

func newTracker(replica string) *tracker {
	return &tracker{streams: map[int64]*streamState{}, replica: replica, now: time.Now}
}

func (t *tracker) open(id int64, delta bool) {
	t.mu.Lock()
	defer t.mu.Unlock()
	t.streams[id] = &streamState{delta: delta, opened: t.now(), types: map[string]*typeState{}}
}

func (t *tracker) close(id int64) {
	t.mu.Lock()
	defer t.mu.Unlock()
	delete(t.streams, id)
}

// setNode records the stream's node; it reports whether this is the first
// time for the stream.
func (t *tracker) setNode(id int64, node, generator string) bool {
	t.mu.Lock()
	defer t.mu.Unlock()
	s := t.streams[id]
	if s == nil || s.node != "" {
		return false
	}
	s.node, s.generator = node, generator
	return true
}

func (t *tracker) typ(s *streamState, typeURL string) *typeState {
	ts := s.types[typeURL]
	if ts == nil {
		ts = &typeState{nonces: map[string]string{}}
		s.types[typeURL] = ts
	}
	return ts
}

// sent records a response.
func (t *tracker) sent(id int64, typeURL, version, nonce string) {
	t.mu.Lock()
	defer t.mu.Unlock()
	s := t.streams[id]
	if s == nil {
		return
	}
	ts := t.typ(s, typeURL)
	ts.sent, ts.nackErr, ts.sentAt = version, "", t.now()
	if len(ts.nonces) > 16 {
		clear(ts.nonces)
	}
	ts.nonces[nonce] = version
}

// answered records a request that answers a response (nonce set). It
// returns the version acknowledged or rejected, and whether it was an ACK.
func (t *tracker) answered(id int64, typeURL, nonce, errMsg string) (string, bool) {
	t.mu.Lock()
	defer t.mu.Unlock()
	s := t.streams[id]
	if s == nil || nonce == "" {
		return "", false
	}
	ts := t.typ(s, typeURL)
	v, ok := ts.nonces[nonce]
	if !ok {
		return "", false
	}
	delete(ts.nonces, nonce)
	if errMsg != "" {
		if v == ts.sent {
			ts.nackErr = errMsg
		}
		return v, false
	}
	ts.acked, ts.ackedAt = v, t.now()
	return v, true
}

func (t *tracker) snapshot() []ProxyStatus {
	t.mu.Lock()
	defer t.mu.Unlock()
	var out []ProxyStatus
	for _, s := range t.streams {
		if s.node == "" {
			continue
		}
		ps := ProxyStatus{ID: s.node, Replica: t.replica, Delta: s.delta, Generator: s.generator, Connected: s.opened,
			Types: map[string]*TypeStatus{}}
		for typ, ts := range s.types {
			st := &TypeStatus{Sent: ts.sent, Acked: ts.acked, Error: ts.nackErr, SentAt: ts.sentAt, AckedAt: ts.ackedAt}
			switch {
			case ts.nackErr != "":
				st.State = StateNACK
			case ts.sent == "":
				st.State = StateNotSent
			case ts.sent == ts.acked:
				st.State = StateSynced
			default:
				st.State = StateStale
			}
			ps.Types[typ] = st
		}
		out = append(out, ps)
	}
	sort.Slice(out, func(i, j int) bool { return out[i].ID < out[j].ID })
	return out
}
