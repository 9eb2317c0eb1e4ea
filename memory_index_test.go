package idempotency

import (
	"math/rand/v2"
	"testing"

	"github.com/stretchr/testify/require"
)

// memIndexModel drives a memIndex the way a shard does, entries kept dense
// and the last moved into a hole, and checks it against a map after every
// step.
type memIndexModel struct {
	t       *testing.T
	x       memIndex
	entries []memEntry
	want    map[memKey]int
}

func newMemIndexModel(t *testing.T) *memIndexModel {
	return &memIndexModel{t: t, want: map[memKey]int{}}
}

// key returns the index key numbered i.
func memIndexKey(i int) memKey {
	var k memKey
	k[0] = memKeyHashed
	k[1], k[2], k[3] = byte(i), byte(i>>8), byte(i>>16)
	return k
}

func (m *memIndexModel) add(k memKey, frag uint32) {
	pos, slot := m.x.find(&k, frag, m.entries)
	require.Equal(m.t, -1, pos, "a new key is not found")
	n := len(m.entries)
	m.x.insert(slot, frag, n, n+1)
	m.entries = append(m.entries, memEntry{key: k, frag: frag})
	m.want[k] = n
}

func (m *memIndexModel) remove(i int) {
	e := m.entries[i]
	m.x.remove(m.x.slotOf(e.frag, i))
	last := len(m.entries) - 1
	if i != last {
		m.entries[i] = m.entries[last]
		m.x.move(m.entries[i].frag, last, i)
		m.want[m.entries[i].key] = i
	}
	m.entries = m.entries[:last]
	delete(m.want, e.key)
}

func (m *memIndexModel) check() {
	m.t.Helper()
	used := 0
	for _, s := range m.x.slots {
		if s != 0 {
			used++
		}
	}
	if used != len(m.want) {
		m.t.Fatalf("%d slots used for %d records", used, len(m.want))
	}
	if 4*used > memIndexMaxLoad*len(m.x.slots) {
		m.t.Fatalf("%d records in %d slots", used, len(m.x.slots))
	}
	for k, at := range m.want {
		if pos, _ := m.x.find(&k, m.entries[at].frag, m.entries); pos != at {
			m.t.Fatalf("key %x found at %d, want %d", k[1:4], pos, at)
		}
	}
}

func TestMemIndex(t *testing.T) {
	// Fragments drawn from a few values crowd keys onto the same home
	// slots, and values near the top wrap their probes round the end of
	// the table: the cases a removal's backward shift must get right.
	frags := []uint32{0, 1, 0x7fffffff, 0x80000000, 0xfffffff0, 0xffffffff}
	for _, name := range []string{"crowded", "random"} {
		t.Run(name, func(t *testing.T) {
			rng := rand.New(rand.NewPCG(1, 2))
			frag := func() uint32 {
				if name == "crowded" {
					return frags[rng.IntN(len(frags))]
				}
				return rng.Uint32()
			}
			m := newMemIndexModel(t)
			next := 0
			for step := range 20_000 {
				// Grow to a few hundred records, then shrink to none,
				// twice.
				growing := step%10_000 < 5_000
				if len(m.entries) == 0 || (growing && rng.IntN(3) > 0) || (!growing && rng.IntN(3) == 0) {
					m.add(memIndexKey(next), frag())
					next++
				} else {
					m.remove(rng.IntN(len(m.entries)))
				}
				if step%97 == 0 || len(m.entries) < 20 {
					m.check()
				}
				if len(m.entries) == 0 && step%10_000 >= 5_000 {
					m.x.resize(0)
					require.Nil(t, m.x.slots, "an index resized for nothing holds nothing")
				}
			}
			m.check()

			// A rebuild at a smaller size keeps every record findable.
			for len(m.entries) < 300 {
				m.add(memIndexKey(next), frag())
				next++
			}
			for len(m.entries) > 30 {
				m.remove(0)
			}
			before := len(m.x.slots)
			m.x.resize(len(m.entries))
			require.Less(t, len(m.x.slots), before, "the rebuilt index is smaller")
			m.check()
		})
	}
}

func TestMemIndexRebuildsBetweenChanges(t *testing.T) {
	// The shard's shrink path, resize to the records held, taken at any
	// point of a run of additions and removals, and resize(0) when empty.
	frags := []uint32{0, 1, 0x7fffffff, 0x80000000, 0xfffffff0, 0xffffffff}
	rng := rand.New(rand.NewPCG(3, 4))
	m := newMemIndexModel(t)
	next := 0
	rebuilt := 0
	for step := range 200_000 {
		// Additions outnumber removals for 20,000 steps, then the other
		// way round, and so on.
		addBelow := 52
		if step/20_000%2 == 1 {
			addBelow = 42
		}
		switch r := rng.IntN(100); {
		case r < 2:
			m.x.resize(len(m.entries))
			rebuilt++
		case len(m.entries) == 0 || r < addBelow:
			f := rng.Uint32()
			if rng.IntN(2) == 0 {
				f = frags[rng.IntN(len(frags))]
			}
			m.add(memIndexKey(next), f)
			next++
		default:
			m.remove(rng.IntN(len(m.entries)))
		}
		if step%101 == 0 || len(m.entries) < 12 {
			m.check()
		}
	}
	m.check()
	require.Greater(t, rebuilt, 1000)
}

func TestMemIndexFindsAbsentKeyInEmptyTable(t *testing.T) {
	var x memIndex
	k := memIndexKey(1)
	pos, slot := x.find(&k, 7, nil)
	require.Equal(t, -1, pos)
	require.Equal(t, -1, slot, "no slot in a table with none")
	x.insert(slot, 7, 0, 1)
	require.Len(t, x.slots, memIndexMin)
	pos, _ = x.find(&k, 7, []memEntry{{key: k, frag: 7}})
	require.Equal(t, 0, pos)
}

// FuzzMemIndex runs a series of additions, removals and rebuilds, read
// from the input, against the map model. Each step is a byte: a byte that
// is 0 modulo 16 rebuilds the table for the records held (the shard's
// shrink path); another even byte adds a key whose fragment is taken from
// the next four bytes (so that the fuzzer can crowd or wrap them); an odd
// one removes the record at a position chosen by the byte.
func FuzzMemIndex(f *testing.F) {
	f.Add([]byte{2, 0, 0, 0, 0, 2, 0, 0, 0, 0, 2, 0, 0, 0, 0, 1, 0, 3})
	f.Add([]byte{2, 0xff, 0xff, 0xff, 0xff, 2, 0, 0, 0, 0, 2, 0xff, 0xff, 0xff, 0xf0, 5, 16, 7})
	f.Fuzz(func(t *testing.T, ops []byte) {
		m := newMemIndexModel(t)
		next := 0
		for len(ops) > 0 {
			op := ops[0]
			ops = ops[1:]
			switch {
			case op%16 == 0:
				m.x.resize(len(m.entries))
			case op%2 == 1 && len(m.entries) > 0:
				m.remove(int(op/2) % len(m.entries))
			default:
				var frag uint32
				for range 4 {
					frag <<= 8
					if len(ops) > 0 {
						frag |= uint32(ops[0])
						ops = ops[1:]
					}
				}
				m.add(memIndexKey(next), frag)
				next++
			}
			m.check()
		}
	})
}
