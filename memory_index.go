package idempotency

// memIndex is a shard's index by key: an open-addressing hash table, with
// linear probing, of positions in the shard's entries.
//
// A Go map of a 33-byte key to an int32 was what the index was before. In a
// store holding many records a map lookup is several dependent cache misses
// (the map's table, its groups, the control word, the slot), and a claim of
// a new key took two of them, one to find the key absent and one to insert
// it. Here a claim probes one slot array once, from which it inserts, and
// the whole index is 8 bytes a slot: a shard of a million records holds 16
// MiB of index at most, against about 47 MiB for the map.
//
// Each slot is 0 when empty, or the key's hash fragment (the high 32 bits of
// its seeded hash) in its high half and the record's position plus one in
// its low half. A slot's home, where probing for its key starts, is the
// top bits of the fragment, so the table grows and rebuilds from its slots
// alone, without rehashing a key. A fragment that matches is confirmed
// against the key in the entry; a fragment that differs rules the slot out
// without reading the entry.
//
// Removal shifts later slots back into the hole (no tombstones), so a probe
// always ends at the first empty slot.
type memIndex struct {
	slots []uint64 // length a power of two, at least memIndexMin; nil when empty
}

const (
	// memIndexMin is the number of slots of a table in use, the fewest.
	memIndexMin = 8
	// memIndexMaxLoad is the most records a table holds, per four slots:
	// the table doubles beyond three quarters full.
	memIndexMaxLoad = 3
)

// memSlot returns the slot of the record at position pos with hash
// fragment frag.
func memSlot(frag uint32, pos int) uint64 { return uint64(frag)<<32 | uint64(pos+1) }

// memSlotPos returns the position of the record in slot s, which is not
// empty.
func memSlotPos(s uint64) int { return int(uint32(s)) - 1 }

// home returns the slot where probing for the fragment frag starts.
func (x *memIndex) home(frag uint32) int {
	// len(slots) is 1<<b with 3 <= b <= 32: the top b bits of frag.
	return int(uint64(frag) * uint64(len(x.slots)) >> 32)
}

// find returns the position of the record whose key is k (with fragment
// frag) among entries, or -1 and the empty slot where it would go; a table
// with no slots returns -1, -1.
func (x *memIndex) find(k *memKey, frag uint32, entries []memEntry) (pos, slot int) {
	if len(x.slots) == 0 {
		return -1, -1
	}
	mask := len(x.slots) - 1
	for i := x.home(frag); ; i = (i + 1) & mask {
		s := x.slots[i]
		if s == 0 {
			return -1, i
		}
		if uint32(s>>32) == frag {
			if p := memSlotPos(s); entries[p].key == *k {
				return p, i
			}
		}
	}
}

// insert indexes the record at position pos, with fragment frag, in the
// empty slot that find returned for it (-1 for a table with no slots).
// n is the number of records the table holds afterwards.
func (x *memIndex) insert(slot int, frag uint32, pos, n int) {
	if slot < 0 || n*4 > len(x.slots)*memIndexMaxLoad {
		x.resize(n)
		slot = x.empty(frag)
	}
	x.slots[slot] = memSlot(frag, pos)
}

// empty returns the first empty slot from frag's home on.
func (x *memIndex) empty(frag uint32) int {
	mask := len(x.slots) - 1
	i := x.home(frag)
	for x.slots[i] != 0 {
		i = (i + 1) & mask
	}
	return i
}

// slotOf returns the slot that indexes position pos, whose record has the
// fragment frag. The record is indexed.
func (x *memIndex) slotOf(frag uint32, pos int) int {
	mask := len(x.slots) - 1
	want := memSlot(frag, pos)
	i := x.home(frag)
	for x.slots[i] != want {
		i = (i + 1) & mask
	}
	return i
}

// move records that the record indexed at position from, with fragment
// frag, is now at position to.
func (x *memIndex) move(frag uint32, from, to int) {
	x.slots[x.slotOf(frag, from)] = memSlot(frag, to)
}

// remove empties slot i and moves back the slots after it whose probe
// would otherwise no longer reach them.
func (x *memIndex) remove(i int) {
	mask := len(x.slots) - 1
	for j := (i + 1) & mask; x.slots[j] != 0; j = (j + 1) & mask {
		// The slot at j may fill the hole at i if its home is not after
		// the hole: its probe from home to j passes i.
		if h := x.home(uint32(x.slots[j] >> 32)); (j-h)&mask >= (j-i)&mask {
			x.slots[i] = x.slots[j]
			i = j
		}
	}
	x.slots[i] = 0
}

// resize rebuilds the table with room for n records, or drops it when n is
// 0. The slots of the old table are moved as they are: a slot's home comes
// from its fragment.
func (x *memIndex) resize(n int) {
	if n == 0 {
		x.slots = nil
		return
	}
	size := memIndexMin
	for n*4 > size*memIndexMaxLoad {
		size *= 2
	}
	old := x.slots
	x.slots = make([]uint64, size)
	for _, s := range old {
		if s != 0 {
			x.slots[x.empty(uint32(s>>32))] = s
		}
	}
}
