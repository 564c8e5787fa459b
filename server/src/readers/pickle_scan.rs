//! A pickle opcode scanner for `torch.save` files: it checks every global a pickle names
//! against [`ALLOWED_GLOBALS`] and recovers the order of the saved dicts' keys.
//!
//! `pytorch-reader` never executes a pickle either, but it accepts any global and returns
//! tensors in a `HashMap`. This scanner runs first, over the same bytes, and fails closed:
//! a global outside the allowlist, a `STACK_GLOBAL` whose operands are not known strings,
//! or an extension-registry opcode (a global by number) refuses the file.
//!
//! The scanner is a model of CPython's unpickler stack machine (every opcode and argument
//! layout of `pickletools`, protocols 0 to 5) over inert values: strings, ints and globals
//! are kept, containers live in a flat arena so memo aliasing behaves as in Python, and
//! everything else is an opaque placeholder. Every opcode consumes at least one byte, so a
//! scan takes at most `data.len()` steps; every declared length is checked against the
//! bytes present before anything is sliced; the arena grows by at most one node per opcode,
//! and as it holds indices rather than nested boxes, dropping a deep or cyclic pickle
//! neither recurses nor leaks.

use std::collections::HashMap;
use std::rc::Rc;

/// Globals a pickle may name: the tensor-rebuild machinery `torch.save` writes, plus the
/// data-only values real checkpoints carry beside their weights (optimizer and training
/// metadata: `OrderedDict`, sets, numpy scalars, `argparse` namespaces, devices, dtypes).
///
/// Entries are `(module, name)` compared exactly with what the pickle says, before any
/// Python 2 name mapping. A name starting with `*` matches any plain identifier ending with
/// the rest (`numpy.dtypes.Float32DType`, ...). Everything else, notably any module class
/// (`torch.save(model)` pickles `__main__.Net` and `torch.nn.modules.*`), `builtins.eval`,
/// `os.system` or `torch.load`, is refused.
pub(crate) const ALLOWED_GLOBALS: &[(&str, &str)] = &[
    // Tensor rebuild functions, current and historical.
    ("torch._utils", "_rebuild_tensor"),
    ("torch._utils", "_rebuild_tensor_v2"),
    ("torch._utils", "_rebuild_tensor_v3"),
    ("torch._utils", "_rebuild_parameter"),
    ("torch._utils", "_rebuild_parameter_with_state"),
    ("torch._tensor", "_rebuild_from_type_v2"),
    ("torch.nn.parameter", "Parameter"),
    ("torch", "Tensor"),
    ("torch", "Size"),
    ("torch", "device"),
    // Storage classes named in persistent ids.
    ("torch", "FloatStorage"),
    ("torch", "HalfStorage"),
    ("torch", "BFloat16Storage"),
    ("torch", "DoubleStorage"),
    ("torch", "LongStorage"),
    ("torch", "IntStorage"),
    ("torch", "ShortStorage"),
    ("torch", "CharStorage"),
    ("torch", "ByteStorage"),
    ("torch", "BoolStorage"),
    ("torch", "UntypedStorage"),
    ("torch", "ComplexFloatStorage"),
    ("torch", "ComplexDoubleStorage"),
    // GPU-saved files before torch 1.0 name the CUDA storage classes (same data, read
    // on the CPU like the others).
    ("torch.cuda", "FloatStorage"),
    ("torch.cuda", "HalfStorage"),
    ("torch.cuda", "DoubleStorage"),
    ("torch.cuda", "LongStorage"),
    ("torch.cuda", "IntStorage"),
    ("torch.cuda", "ShortStorage"),
    ("torch.cuda", "CharStorage"),
    ("torch.cuda", "ByteStorage"),
    // Tensor type classes the tar layout's `tensors` table names (torch < 0.1.10).
    ("torch", "FloatTensor"),
    ("torch", "HalfTensor"),
    ("torch", "DoubleTensor"),
    ("torch", "LongTensor"),
    ("torch", "IntTensor"),
    ("torch", "ShortTensor"),
    ("torch", "CharTensor"),
    ("torch", "ByteTensor"),
    // dtypes (`_rebuild_tensor_v3` arguments, dtypes saved in configs).
    ("torch", "float32"),
    ("torch", "float"),
    ("torch", "float16"),
    ("torch", "half"),
    ("torch", "bfloat16"),
    ("torch", "float64"),
    ("torch", "double"),
    ("torch", "int64"),
    ("torch", "long"),
    ("torch", "int32"),
    ("torch", "int"),
    ("torch", "int16"),
    ("torch", "int8"),
    ("torch", "uint8"),
    ("torch", "bool"),
    ("torch", "complex64"),
    ("torch", "complex128"),
    // The state dict itself, and sets (protocols below 4 spell them as calls).
    ("collections", "OrderedDict"),
    ("builtins", "set"),
    ("builtins", "frozenset"),
    ("__builtin__", "set"),
    ("__builtin__", "frozenset"),
    // Protocol 2 spells `bytes` as `_codecs.encode(str, "latin1")`.
    ("_codecs", "encode"),
    // numpy scalars (`best_acc = np.float64(...)`) as numpy pickles them.
    ("numpy.core.multiarray", "scalar"),
    ("numpy._core.multiarray", "scalar"),
    ("numpy", "dtype"),
    ("numpy.dtypes", "*DType"),
    // `args` saved by argparse-driven training scripts.
    ("argparse", "Namespace"),
];

/// Whether `module.name` is in [`ALLOWED_GLOBALS`].
pub(crate) fn is_allowed(module: &str, name: &str) -> bool {
    ALLOWED_GLOBALS.iter().any(|&(m, n)| {
        m == module
            && match n.strip_prefix('*') {
                // A wildcard must not match an attribute path (`X.__init__.fooDType`).
                Some(suffix) => {
                    name.len() > suffix.len()
                        && name.ends_with(suffix)
                        && name.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_')
                }
                None => n == name,
            }
    })
}

/// Why a scan stopped.
#[derive(Debug)]
pub(crate) enum ScanError {
    /// A global outside the allowlist, as `module.name` (or a placeholder saying why it
    /// could not be named).
    Forbidden(String),
    /// The bytes end before the pickle does: the caller may retry with more of the file.
    Truncated(String),
    /// Not a well-formed pickle.
    Malformed(String),
}

/// An inert stand-in for a Python value.
#[derive(Debug, Clone)]
pub(crate) enum Val {
    /// `str` (or a Python 2 `str` that is valid UTF-8).
    Str(Rc<str>),
    /// An `int` that fits an `i64`.
    Int(i64),
    /// A global, already checked against the allowlist.
    Global(Rc<str>, Rc<str>),
    /// A tuple, list, dict or object in the arena.
    Node(usize),
    /// Anything else (floats, bytes, None, bools, persistent ids ...).
    Other,
}

/// A container or object; its members are arena indices, never nested boxes.
#[derive(Debug)]
enum Node {
    Tuple(Vec<Val>),
    /// Lists and sets (read as lists, as `pytorch-reader` does).
    List(Vec<Val>),
    Dict(Dict),
    /// The result of a call or class instantiation, with the state `BUILD` gave it.
    Object(Option<Val>),
}

/// A dict in insertion order, as Python keeps it.
#[derive(Debug, Default)]
struct Dict {
    /// Keys as `pytorch-reader` spells them (`str`, or an `int` in decimal); `None` for
    /// keys of other types, which no tensor name can come from.
    entries: Vec<(Option<Rc<str>>, Val)>,
    index: HashMap<Rc<str>, usize>,
}

impl Dict {
    /// Python semantics: a repeated key keeps its first position and takes the new value.
    fn insert(&mut self, key: Option<Rc<str>>, value: Val) {
        match key {
            Some(k) => match self.index.get(&k) {
                Some(&at) => {
                    if let Some(slot) = self.entries.get_mut(at) {
                        slot.1 = value;
                    }
                }
                None => {
                    self.index.insert(k.clone(), self.entries.len());
                    self.entries.push((Some(k), value));
                }
            },
            None => self.entries.push((None, value)),
        }
    }
}

/// One scanned pickle.
#[derive(Debug)]
pub(crate) struct Pickle {
    /// Offset just past the `STOP` opcode: where the next pickle of a stream starts.
    pub end: usize,
    /// The value `STOP` returned.
    pub root: Val,
    arena: Vec<Node>,
}

/// Where a leaf value sits in the saved object, as `pytorch-reader` names it.
#[derive(Debug, Clone)]
pub(crate) struct LeafPath {
    /// Position in depth-first, insertion-ordered traversal: the state dict's order.
    pub order: usize,
    /// Number of dict keys / list indices on the path (1 for a key of the root dict).
    pub components: usize,
    /// The first path component (the root dict's key).
    pub first: Rc<str>,
}

/// Deepest container nesting walked when recording key order; state dicts nest a few levels.
const MAX_WALK_DEPTH: usize = 128;
/// Most values visited when recording key order. Memo references can make the object graph
/// a DAG that unfolds exponentially; a checkpoint needs a small fraction of this (the same
/// bound `pytorch-reader` puts on memo copies).
const MAX_WALK_VISITS: usize = 1_000_000;
/// Most bytes of recorded leaf names: a bound on the memory a hostile unfolding can claim.
const MAX_WALK_NAME_BYTES: usize = 64 << 20;
/// Most container items copied by calls (`OrderedDict(items)`, `set(items)`, `BUILD` of a
/// dict) during one scan.
const MAX_COPIED_VALUES: usize = 4_000_000;

impl Pickle {
    /// The items of a tuple or list value.
    pub(crate) fn items(&self, v: &Val) -> Option<&[Val]> {
        match v {
            Val::Node(i) => match self.arena.get(*i)? {
                Node::Tuple(items) | Node::List(items) => Some(items),
                _ => None,
            },
            _ => None,
        }
    }

    /// Every leaf (non-container value) reachable from the root, keyed by the dotted name
    /// `pytorch-reader` gives a tensor there (dict keys and list indices joined by `.`),
    /// first occurrence only, in depth-first insertion order. A `torch.nn.Module` object
    /// is walked as its `state_dict()` (parameters, buffers, then children), as
    /// `pytorch-reader` reads it.
    pub(crate) fn leaf_paths(&self) -> Result<HashMap<String, LeafPath>, ScanError> {
        let mut out = HashMap::new();
        let mut walk = Walk {
            pickle: self,
            path: Vec::new(),
            on_path: Vec::new(),
            out: &mut out,
            budget: MAX_WALK_VISITS,
            name_bytes: 0,
        };
        walk.visit(&self.root)?;
        Ok(out)
    }

    fn dict(&self, v: &Val) -> Option<&Dict> {
        match v {
            Val::Node(i) => match self.arena.get(*i)? {
                Node::Dict(d) => Some(d),
                _ => None,
            },
            _ => None,
        }
    }
}

struct Walk<'a> {
    pickle: &'a Pickle,
    path: Vec<Rc<str>>,
    /// Nodes on the current path: a cycle (a list appended to itself) is not followed.
    on_path: Vec<usize>,
    out: &'a mut HashMap<String, LeafPath>,
    budget: usize,
    /// Bytes of leaf names recorded so far.
    name_bytes: usize,
}

impl Walk<'_> {
    fn visit(&mut self, v: &Val) -> Result<(), ScanError> {
        self.budget = self.budget.checked_sub(1).ok_or_else(|| {
            ScanError::Malformed(format!(
                "the pickle's object graph unfolds to more than {MAX_WALK_VISITS} values (memo bomb?)"
            ))
        })?;
        let node = match v {
            Val::Node(i) => *i,
            _ => return self.leaf(),
        };
        if self.on_path.contains(&node) || self.path.len() >= MAX_WALK_DEPTH {
            return Ok(());
        }
        let pickle = self.pickle;
        self.on_path.push(node);
        let result = match pickle.arena.get(node) {
            Some(Node::Dict(d)) => self.entries(&d.entries),
            Some(Node::Tuple(items) | Node::List(items)) => {
                let mut r = Ok(());
                for (i, item) in items.iter().enumerate() {
                    r = self.child(Rc::from(i.to_string()), item);
                    if r.is_err() {
                        break;
                    }
                }
                r
            }
            Some(Node::Object(Some(state))) => match module_tables(pickle, state) {
                Some(tables) => {
                    let mut r = Ok(());
                    for t in tables {
                        r = self.entries(&t.entries);
                        if r.is_err() {
                            break;
                        }
                    }
                    r
                }
                None => self.leaf(),
            },
            Some(Node::Object(None)) | None => self.leaf(),
        };
        self.on_path.pop();
        result
    }

    fn entries(&mut self, entries: &[(Option<Rc<str>>, Val)]) -> Result<(), ScanError> {
        for (k, v) in entries {
            if let Some(k) = k {
                self.child(k.clone(), v)?;
            }
        }
        Ok(())
    }

    fn child(&mut self, key: Rc<str>, v: &Val) -> Result<(), ScanError> {
        self.path.push(key);
        let r = self.visit(v);
        self.path.pop();
        r
    }

    fn leaf(&mut self) -> Result<(), ScanError> {
        let Some(first) = self.path.first() else {
            return Ok(());
        };
        let name = self.path.iter().map(|s| &**s).collect::<Vec<_>>().join(".");
        self.name_bytes = self.name_bytes.saturating_add(name.len());
        if self.name_bytes > MAX_WALK_NAME_BYTES {
            return Err(ScanError::Malformed(format!(
                "the pickle's object graph names more than {MAX_WALK_NAME_BYTES} bytes of keys"
            )));
        }
        let order = self.out.len();
        let (components, first) = (self.path.len(), first.clone());
        self.out.entry(name).or_insert(LeafPath {
            order,
            components,
            first,
        });
        Ok(())
    }
}

/// The `_parameters`, `_buffers` and `_modules` dicts of a pickled `torch.nn.Module`'s
/// `__dict__`, when `state` is one.
fn module_tables<'a>(p: &'a Pickle, state: &Val) -> Option<[&'a Dict; 3]> {
    let d = p.dict(state)?;
    let table = |name: &str| {
        d.index
            .get(name)
            .and_then(|&i| d.entries.get(i))
            .and_then(|(_, v)| p.dict(v))
    };
    Some([
        table("_parameters")?,
        table("_buffers")?,
        table("_modules")?,
    ])
}

/// Scans the pickle starting at `data[start]` up to and including its `STOP`.
pub(crate) fn scan(data: &[u8], start: usize) -> Result<Pickle, ScanError> {
    let mut m = Machine {
        data,
        pos: start,
        op_at: start,
        stack: Vec::new(),
        marks: Vec::new(),
        memo: HashMap::new(),
        arena: Vec::new(),
        copied: 0,
    };
    let root = m.run()?;
    Ok(Pickle {
        end: m.pos,
        root,
        arena: m.arena,
    })
}

struct Machine<'a> {
    data: &'a [u8],
    pos: usize,
    /// Offset of the opcode being executed, for error messages.
    op_at: usize,
    stack: Vec<Val>,
    /// Stack heights at each open MARK, innermost last (CPython's metastack).
    marks: Vec<usize>,
    memo: HashMap<u64, Val>,
    arena: Vec<Node>,
    /// Values copied by calls so far (see [`Machine::charge`]).
    copied: usize,
}

impl Machine<'_> {
    fn malformed(&self, what: impl std::fmt::Display) -> ScanError {
        let op = self.data.get(self.op_at).copied().unwrap_or(0);
        ScanError::Malformed(format!(
            "pickle opcode 0x{op:02x} at byte {}: {what}",
            self.op_at
        ))
    }

    fn take(&mut self, n: u64) -> Result<&[u8], ScanError> {
        let avail = self.data.len().saturating_sub(self.pos);
        let n = usize::try_from(n)
            .ok()
            .filter(|&n| n <= avail)
            .ok_or_else(|| {
                ScanError::Truncated(format!(
                    "pickle opcode at byte {} needs {n} bytes of argument but only {avail} remain",
                    self.op_at
                ))
            })?;
        let start = self.pos;
        self.pos += n;
        Ok(&self.data[start..start + n])
    }

    fn arr<const N: usize>(&mut self) -> Result<[u8; N], ScanError> {
        let b = self.take(N as u64)?;
        let mut out = [0u8; N];
        out.copy_from_slice(b);
        Ok(out)
    }

    fn u8(&mut self) -> Result<u8, ScanError> {
        Ok(self.arr::<1>()?[0])
    }

    fn u32(&mut self) -> Result<u32, ScanError> {
        Ok(u32::from_le_bytes(self.arr()?))
    }

    fn u64(&mut self) -> Result<u64, ScanError> {
        Ok(u64::from_le_bytes(self.arr()?))
    }

    /// A signed 4-byte length (`BINSTRING`, `LONG4`, `EXT4`): negative is an error.
    fn len_i32(&mut self) -> Result<u64, ScanError> {
        let v = i32::from_le_bytes(self.arr()?);
        u64::try_from(v).map_err(|_| self.malformed(format!("negative length {v}")))
    }

    /// A newline-terminated text argument, without its `\n`.
    fn line(&mut self) -> Result<&[u8], ScanError> {
        let rest = self.data.get(self.pos..).unwrap_or(&[]);
        let Some(n) = rest.iter().position(|&b| b == b'\n') else {
            return Err(ScanError::Truncated(format!(
                "pickle opcode at byte {}: text argument has no terminating newline",
                self.op_at
            )));
        };
        self.pos += n + 1;
        Ok(&rest[..n])
    }

    fn line_str(&mut self) -> Result<String, ScanError> {
        let l = self.line()?.to_vec();
        String::from_utf8(l).map_err(|_| self.malformed("text argument is not UTF-8"))
    }

    fn push_node(&mut self, n: Node) -> Val {
        self.arena.push(n);
        Val::Node(self.arena.len() - 1)
    }

    fn pop(&mut self) -> Result<Val, ScanError> {
        if self.marks.last() == Some(&self.stack.len()) {
            return Err(self.malformed("stack underflow (only a MARK left)"));
        }
        self.stack
            .pop()
            .ok_or_else(|| self.malformed("stack underflow"))
    }

    fn top(&self) -> Result<&Val, ScanError> {
        if self.marks.last() == Some(&self.stack.len()) {
            return Err(self.malformed("stack underflow (only a MARK left)"));
        }
        self.stack
            .last()
            .ok_or_else(|| self.malformed("stack underflow"))
    }

    fn pop_mark(&mut self) -> Result<Vec<Val>, ScanError> {
        let mark = self
            .marks
            .pop()
            .ok_or_else(|| self.malformed("no MARK on the stack"))?;
        // Marks are only ever pushed at the current height and the stack only shrinks to a
        // mark through this function, so `mark <= len`; `min` keeps that from mattering.
        let at = mark.min(self.stack.len());
        Ok(self.stack.split_off(at))
    }

    fn node_mut(&mut self, v: &Val) -> Option<&mut Node> {
        match v {
            Val::Node(i) => self.arena.get_mut(*i),
            _ => None,
        }
    }

    fn check_global(&self, module: &str, name: &str) -> Result<(), ScanError> {
        if is_allowed(module, name) {
            Ok(())
        } else {
            Err(ScanError::Forbidden(format!("{module}.{name}")))
        }
    }

    fn int_val(&self, text: &[u8]) -> Result<Val, ScanError> {
        let t = std::str::from_utf8(text)
            .map_err(|_| self.malformed("integer is not ASCII"))?
            .trim();
        let t = t.strip_suffix('L').unwrap_or(t);
        let digits = t.strip_prefix(['-', '+']).unwrap_or(t);
        if digits.is_empty() || !digits.bytes().all(|b| b.is_ascii_digit()) {
            return Err(self.malformed(format!("invalid integer {t:?}")));
        }
        Ok(t.parse::<i64>().map(Val::Int).unwrap_or(Val::Other))
    }

    fn append(&mut self, items: Vec<Val>) -> Result<(), ScanError> {
        let target = self.top()?.clone();
        match self.node_mut(&target) {
            Some(Node::List(list)) => {
                list.extend(items);
                Ok(())
            }
            // `obj.append`/`obj.extend` on some other object: nothing to record.
            Some(Node::Object(_)) => Ok(()),
            _ => Err(self.malformed("APPEND/APPENDS/ADDITEMS target is not a list or set")),
        }
    }

    fn set_items(&mut self, items: Vec<Val>) -> Result<(), ScanError> {
        if !items.len().is_multiple_of(2) {
            return Err(self.malformed("dict items do not come in key/value pairs"));
        }
        let target = self.top()?.clone();
        let mut pairs = items.into_iter();
        match self.node_mut(&target) {
            Some(Node::Dict(d)) => {
                while let (Some(k), Some(v)) = (pairs.next(), pairs.next()) {
                    d.insert(dict_key(&k), v);
                }
                Ok(())
            }
            Some(Node::Object(_)) => Ok(()),
            _ => Err(self.malformed("SETITEM/SETITEMS target is not a dict")),
        }
    }

    /// What a call of `callable(*args)` leaves on the stack, for the few calls whose result
    /// shapes the saved object's structure; anything else is a fresh opaque object.
    fn reduce(&mut self, mut callable: Val, mut args: Val) -> Result<Val, ScanError> {
        // `_rebuild_from_type_v2(func, type, args, state)` calls `func(*args)`; a chain of
        // them is bounded so a crafted nesting cannot loop.
        for _ in 0..8 {
            let Val::Global(module, name) = &callable else {
                break;
            };
            match (&**module, &**name) {
                ("collections", "OrderedDict") => {
                    let mut d = Dict::default();
                    let items = match self.arg_at(&args, 0) {
                        Some(v) => self.seq(&v)?.unwrap_or_default(),
                        None => Vec::new(),
                    };
                    for pair in items {
                        if let (Some(k), Some(v)) = (self.arg_at(&pair, 0), self.arg_at(&pair, 1)) {
                            d.insert(dict_key(&k), v);
                        }
                    }
                    return Ok(self.push_node(Node::Dict(d)));
                }
                ("builtins" | "__builtin__", "set" | "frozenset") => {
                    let items = match self.arg_at(&args, 0) {
                        Some(v) => self.seq(&v)?.unwrap_or_default(),
                        None => Vec::new(),
                    };
                    return Ok(self.push_node(Node::List(items)));
                }
                ("torch._utils", "_rebuild_parameter" | "_rebuild_parameter_with_state") => {
                    return Ok(self.arg_at(&args, 0).unwrap_or(Val::Other));
                }
                ("torch._tensor", "_rebuild_from_type_v2") => {
                    let (Some(f), Some(a)) = (self.arg_at(&args, 0), self.arg_at(&args, 2)) else {
                        break;
                    };
                    callable = f;
                    args = a;
                }
                _ => break,
            }
        }
        Ok(self.push_node(Node::Object(None)))
    }

    /// Item `i` of a tuple or list value.
    fn arg_at(&self, v: &Val, i: usize) -> Option<Val> {
        match v {
            Val::Node(n) => match self.arena.get(*n)? {
                Node::Tuple(items) | Node::List(items) => items.get(i).cloned(),
                _ => None,
            },
            _ => None,
        }
    }

    /// Charges `n` copied values against [`MAX_COPIED_VALUES`]: a memoized container can
    /// be passed to a copying call again and again for a few bytes each time.
    fn charge(&mut self, n: usize) -> Result<(), ScanError> {
        self.copied = self.copied.saturating_add(n);
        if self.copied > MAX_COPIED_VALUES {
            return Err(self.malformed(format!(
                "calls copy more than {MAX_COPIED_VALUES} values (memo bomb?)"
            )));
        }
        Ok(())
    }

    /// The items of a tuple or list value, copied (values are cheap handles).
    fn seq(&mut self, v: &Val) -> Result<Option<Vec<Val>>, ScanError> {
        let items = match v {
            Val::Node(i) => match self.arena.get(*i) {
                Some(Node::Tuple(items) | Node::List(items)) => items.clone(),
                _ => return Ok(None),
            },
            _ => return Ok(None),
        };
        self.charge(items.len())?;
        Ok(Some(items))
    }

    fn build(&mut self, state: Val) -> Result<(), ScanError> {
        let target = self.top()?.clone();
        let merged = match (&target, &state) {
            (Val::Node(t), Val::Node(s)) if t != s => match self.arena.get(*s) {
                Some(Node::Dict(sd)) => Some(sd.entries.clone()),
                _ => None,
            },
            _ => None,
        };
        if let Some(m) = &merged {
            self.charge(m.len())?;
        }
        match self.node_mut(&target) {
            // A dict subclass (the state dict's `OrderedDict` with its `_metadata`):
            // `pytorch-reader` merges the state into the items.
            Some(Node::Dict(d)) => {
                for (k, v) in merged.unwrap_or_default() {
                    d.insert(k, v);
                }
            }
            Some(Node::Object(st)) => *st = Some(state),
            _ => {}
        }
        Ok(())
    }

    fn run(&mut self) -> Result<Val, ScanError> {
        loop {
            self.op_at = self.pos;
            let op = self.u8()?;
            match op {
                // PROTO
                0x80 => {
                    let v = self.u8()?;
                    if v > 5 {
                        return Err(self.malformed(format!("unsupported pickle protocol {v}")));
                    }
                }
                // FRAME: framing only helps streaming readers.
                0x95 => {
                    self.u64()?;
                }
                // STOP
                b'.' => return self.pop(),

                // Scalars.
                b'N' | 0x88 | 0x89 => self.stack.push(Val::Other),
                b'I' => {
                    let l = self.line()?.to_vec();
                    let v = if l == b"00" || l == b"01" {
                        Val::Other
                    } else {
                        self.int_val(&l)?
                    };
                    self.stack.push(v);
                }
                b'L' => {
                    let l = self.line()?.to_vec();
                    let v = self.int_val(&l)?;
                    self.stack.push(v);
                }
                b'F' => {
                    let l = self.line()?.to_vec();
                    let ok = std::str::from_utf8(&l)
                        .ok()
                        .is_some_and(|t| t.trim().parse::<f64>().is_ok());
                    if !ok {
                        return Err(self.malformed("invalid FLOAT text"));
                    }
                    self.stack.push(Val::Other);
                }
                b'J' => {
                    let v = i32::from_le_bytes(self.arr()?);
                    self.stack.push(Val::Int(v.into()));
                }
                b'K' => {
                    let v = self.u8()?;
                    self.stack.push(Val::Int(v.into()));
                }
                b'M' => {
                    let v = u16::from_le_bytes(self.arr()?);
                    self.stack.push(Val::Int(v.into()));
                }
                b'G' => {
                    self.take(8)?;
                    self.stack.push(Val::Other);
                }
                0x8a | 0x8b => {
                    let n = if op == 0x8a {
                        u64::from(self.u8()?)
                    } else {
                        self.len_i32()?
                    };
                    let b = self.take(n)?;
                    let v = le_int(b).map_or(Val::Other, Val::Int);
                    self.stack.push(v);
                }

                // Text and bytes.
                b'S' => {
                    let l = self.line()?.to_vec();
                    let v = self.py2_repr_string(&l)?;
                    self.stack.push(v);
                }
                b'T' | b'U' => {
                    let n = if op == b'T' {
                        self.len_i32()?
                    } else {
                        u64::from(self.u8()?)
                    };
                    let b = self.take(n)?;
                    let v = std::str::from_utf8(b).map_or(Val::Other, |s| Val::Str(Rc::from(s)));
                    self.stack.push(v);
                }
                b'V' => {
                    let l = self.line()?.to_vec();
                    let s = raw_unicode_escape(&l)
                        .ok_or_else(|| self.malformed("invalid raw-unicode-escape text"))?;
                    self.stack.push(Val::Str(Rc::from(s)));
                }
                b'X' | 0x8c | 0x8d => {
                    let n = match op {
                        b'X' => u64::from(self.u32()?),
                        0x8c => u64::from(self.u8()?),
                        _ => self.u64()?,
                    };
                    let b = self.take(n)?;
                    let s = std::str::from_utf8(b).map(Rc::from);
                    let s = s.map_err(|_| self.malformed("unicode string is not UTF-8"))?;
                    self.stack.push(Val::Str(s));
                }
                b'B' | b'C' | 0x8e | 0x96 => {
                    let n = match op {
                        b'B' => u64::from(self.u32()?),
                        b'C' => u64::from(self.u8()?),
                        _ => self.u64()?,
                    };
                    self.take(n)?;
                    self.stack.push(Val::Other);
                }
                // NEXT_BUFFER pushes an out-of-band buffer; READONLY_BUFFER changes its flag.
                0x97 => self.stack.push(Val::Other),
                0x98 => {
                    self.top()?;
                }

                // Containers.
                b'(' => self.marks.push(self.stack.len()),
                b')' => {
                    let v = self.push_node(Node::Tuple(Vec::new()));
                    self.stack.push(v);
                }
                b't' => {
                    let items = self.pop_mark()?;
                    let v = self.push_node(Node::Tuple(items));
                    self.stack.push(v);
                }
                0x85..=0x87 => {
                    let n = usize::from(op - 0x84);
                    let mut items = Vec::with_capacity(n);
                    for _ in 0..n {
                        items.push(self.pop()?);
                    }
                    items.reverse();
                    let v = self.push_node(Node::Tuple(items));
                    self.stack.push(v);
                }
                b']' | 0x8f => {
                    let v = self.push_node(Node::List(Vec::new()));
                    self.stack.push(v);
                }
                b'l' | 0x91 => {
                    let items = self.pop_mark()?;
                    let v = self.push_node(Node::List(items));
                    self.stack.push(v);
                }
                b'a' => {
                    let v = self.pop()?;
                    self.append(vec![v])?;
                }
                b'e' | 0x90 => {
                    let items = self.pop_mark()?;
                    self.append(items)?;
                }
                b'}' => {
                    let v = self.push_node(Node::Dict(Dict::default()));
                    self.stack.push(v);
                }
                b'd' => {
                    let items = self.pop_mark()?;
                    if items.len() % 2 != 0 {
                        return Err(self.malformed("dict items do not come in key/value pairs"));
                    }
                    let mut d = Dict::default();
                    let mut it = items.into_iter();
                    while let (Some(k), Some(v)) = (it.next(), it.next()) {
                        d.insert(dict_key(&k), v);
                    }
                    let v = self.push_node(Node::Dict(d));
                    self.stack.push(v);
                }
                b's' => {
                    let v = self.pop()?;
                    let k = self.pop()?;
                    self.set_items(vec![k, v])?;
                }
                b'u' => {
                    let items = self.pop_mark()?;
                    self.set_items(items)?;
                }

                // Stack manipulation.
                b'0' => {
                    if self.marks.last() == Some(&self.stack.len()) {
                        self.marks.pop();
                    } else {
                        self.pop()?;
                    }
                }
                b'1' => {
                    self.pop_mark()?;
                }
                b'2' => {
                    let v = self.top()?.clone();
                    self.stack.push(v);
                }

                // Memo.
                b'g' | b'h' | b'j' => {
                    let idx = match op {
                        b'g' => self.memo_index_text()?,
                        b'h' => u64::from(self.u8()?),
                        _ => u64::from(self.u32()?),
                    };
                    let v = self.memo.get(&idx).cloned().ok_or_else(|| {
                        self.malformed(format!("memo entry {idx} was never stored"))
                    })?;
                    self.stack.push(v);
                }
                b'p' | b'q' | b'r' | 0x94 => {
                    let idx = match op {
                        b'p' => self.memo_index_text()?,
                        b'q' => u64::from(self.u8()?),
                        b'r' => u64::from(self.u32()?),
                        _ => self.memo.len() as u64,
                    };
                    let v = self.top()?.clone();
                    self.memo.insert(idx, v);
                }

                // Globals.
                b'c' | b'i' => {
                    let module = self.line_str()?;
                    let name = self.line_str()?;
                    self.check_global(&module, &name)?;
                    if op == b'c' {
                        self.stack
                            .push(Val::Global(Rc::from(module), Rc::from(name)));
                    } else {
                        // INST: instantiate the class with the marked arguments.
                        self.pop_mark()?;
                        let v = self.push_node(Node::Object(None));
                        self.stack.push(v);
                    }
                }
                0x93 => {
                    let name = self.pop()?;
                    let module = self.pop()?;
                    match (module, name) {
                        (Val::Str(module), Val::Str(name)) => {
                            self.check_global(&module, &name)?;
                            self.stack.push(Val::Global(module, name));
                        }
                        _ => return Err(ScanError::Forbidden("<unresolved STACK_GLOBAL>".into())),
                    }
                }
                0x82..=0x84 => {
                    let code = match op {
                        0x82 => u64::from(self.u8()?),
                        0x83 => u64::from(u16::from_le_bytes(self.arr()?)),
                        _ => self.len_i32()?,
                    };
                    // The copyreg extension registry maps codes to arbitrary globals.
                    return Err(ScanError::Forbidden(format!(
                        "<extension registry code {code}>"
                    )));
                }

                // Persistent ids: storages (zip, legacy) or tensors (tar).
                b'P' => {
                    self.line()?;
                    self.stack.push(Val::Other);
                }
                b'Q' => {
                    self.pop()?;
                    self.stack.push(Val::Other);
                }

                // Calls and objects.
                b'R' => {
                    let args = self.pop()?;
                    let callable = self.pop()?;
                    let v = self.reduce(callable, args)?;
                    self.stack.push(v);
                }
                b'b' => {
                    let state = self.pop()?;
                    self.build(state)?;
                }
                0x81 => {
                    self.pop()?;
                    self.pop()?;
                    let v = self.push_node(Node::Object(None));
                    self.stack.push(v);
                }
                0x92 => {
                    self.pop()?;
                    self.pop()?;
                    self.pop()?;
                    let v = self.push_node(Node::Object(None));
                    self.stack.push(v);
                }
                b'o' => {
                    let items = self.pop_mark()?;
                    if items.is_empty() {
                        return Err(self.malformed("OBJ without a class"));
                    }
                    let v = self.push_node(Node::Object(None));
                    self.stack.push(v);
                }
                other => return Err(self.malformed(format!("unknown opcode 0x{other:02x}"))),
            }
        }
    }

    fn memo_index_text(&mut self) -> Result<u64, ScanError> {
        let l = self.line()?.to_vec();
        std::str::from_utf8(&l)
            .ok()
            .and_then(|t| t.trim().parse::<u64>().ok())
            .ok_or_else(|| self.malformed("invalid memo index"))
    }

    /// Protocol 0 `STRING`: a quoted Python 2 literal. Escaped text is kept opaque, which
    /// makes it unusable as a `STACK_GLOBAL` operand (fail closed) but is otherwise harmless.
    fn py2_repr_string(&self, l: &[u8]) -> Result<Val, ScanError> {
        let quoted = l.len() >= 2 && (l[0] == b'\'' || l[0] == b'"') && l[l.len() - 1] == l[0];
        if !quoted {
            return Err(self.malformed("STRING argument is not quoted"));
        }
        let inner = &l[1..l.len() - 1];
        if inner.contains(&b'\\') {
            return Ok(Val::Other);
        }
        Ok(std::str::from_utf8(inner).map_or(Val::Other, |s| Val::Str(Rc::from(s))))
    }
}

/// A dict key as `pytorch-reader` spells it: a `str`, or an `int` in decimal.
fn dict_key(k: &Val) -> Option<Rc<str>> {
    match k {
        Val::Str(s) => Some(s.clone()),
        Val::Int(i) => Some(Rc::from(i.to_string())),
        _ => None,
    }
}

/// Two's-complement little-endian integer, if it fits an `i64`.
fn le_int(b: &[u8]) -> Option<i64> {
    let negative = b.last().is_some_and(|x| x & 0x80 != 0);
    let fill = if negative { 0xff } else { 0 };
    if b.len() > 8 && (b[8..].iter().any(|&x| x != fill) || (b[7] & 0x80 != 0) != negative) {
        return None;
    }
    let mut buf = [fill; 8];
    let n = b.len().min(8);
    buf[..n].copy_from_slice(&b[..n]);
    Some(i64::from_le_bytes(buf))
}

/// Python's `raw-unicode-escape`: Latin-1 bytes with `\uXXXX` and `\UXXXXXXXX` escapes.
fn raw_unicode_escape(b: &[u8]) -> Option<String> {
    let mut out = String::with_capacity(b.len());
    let mut i = 0;
    while let Some(&c) = b.get(i) {
        let digits = match (c, b.get(i + 1)) {
            (b'\\', Some(b'u')) => 4,
            (b'\\', Some(b'U')) => 8,
            _ => 0,
        };
        if digits == 0 {
            out.push(char::from(c));
            i += 1;
        } else {
            let hex = b.get(i + 2..i + 2 + digits)?;
            let code = u32::from_str_radix(std::str::from_utf8(hex).ok()?, 16).ok()?;
            out.push(char::from_u32(code)?);
            i += 2 + digits;
        }
    }
    Some(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `OrderedDict([("layer2.weight", 1.0), ("layer10.weight", 2.0), ("a", {"x": [3, 4]})])`
    /// as CPython pickles it at protocols 0, 2 and 4.
    const OD0: &[u8] = b"ccollections\nOrderedDict\np0\n(tRp1\nVlayer2.weight\np2\nF1.0\nsVlayer10.weight\np3\nF2.0\nsVa\np4\n(dp5\nVx\np6\n(lp7\nI3\naI4\nass.";
    const OD2: &[u8] = b"\x80\x02ccollections\nOrderedDict\nq\x00)Rq\x01(X\r\x00\x00\x00layer2.weightq\x02G?\xf0\x00\x00\x00\x00\x00\x00X\x0e\x00\x00\x00layer10.weightq\x03G@\x00\x00\x00\x00\x00\x00\x00X\x01\x00\x00\x00aq\x04}q\x05X\x01\x00\x00\x00xq\x06]q\x07(K\x03K\x04esu.";
    const OD4: &[u8] = b"\x80\x04\x95j\x00\x00\x00\x00\x00\x00\x00\x8c\x0bcollections\x94\x8c\x0bOrderedDict\x94\x93\x94)R\x94(\x8c\rlayer2.weight\x94G?\xf0\x00\x00\x00\x00\x00\x00\x8c\x0elayer10.weight\x94G@\x00\x00\x00\x00\x00\x00\x00\x8c\x01a\x94}\x94\x8c\x01x\x94]\x94(K\x03K\x04esu.";

    fn forbidden(data: &[u8]) -> String {
        match scan(data, 0) {
            Err(ScanError::Forbidden(g)) => g,
            other => panic!("expected a forbidden global, got {other:?}"),
        }
    }

    fn ordered_names(data: &[u8]) -> Vec<(String, usize)> {
        let p = scan(data, 0).unwrap();
        assert_eq!(p.end, data.len());
        let mut v: Vec<_> = p
            .leaf_paths()
            .unwrap()
            .into_iter()
            .map(|(k, l)| (l.order, k, l.components))
            .collect();
        v.sort();
        v.into_iter().map(|(_, k, c)| (k, c)).collect()
    }

    #[test]
    fn pickle_key_order_is_insertion_order_at_every_protocol() {
        let want: Vec<(String, usize)> = vec![
            ("layer2.weight".into(), 1),
            ("layer10.weight".into(), 1),
            ("a.x.0".into(), 3),
            ("a.x.1".into(), 3),
        ];
        for data in [OD0, OD2, OD4] {
            assert_eq!(ordered_names(data), want);
        }
    }

    #[test]
    fn pickle_forbidden_globals_are_named() {
        // os.system through STACK_GLOBAL (protocol 4) and GLOBAL (protocol 2).
        let p4 = b"\x80\x04\x95\x1f\x00\x00\x00\x00\x00\x00\x00\x8c\x05posix\x94\x8c\x06system\x94\x93\x94\x8c\x04true\x94\x85\x94R\x94.";
        assert_eq!(forbidden(p4), "posix.system");
        assert_eq!(
            forbidden(b"\x80\x02cposix\nsystem\nq\x00X\x04\x00\x00\x00trueq\x01\x85q\x02Rq\x03."),
            "posix.system"
        );
        assert_eq!(
            forbidden(b"c__builtin__\neval\np0\n(V1\np1\ntp2\nRp3\n."),
            "__builtin__.eval"
        );
        // INST names its class inline.
        assert_eq!(forbidden(b"(S'x'\nios\nsystem\n."), "os.system");
        // A trailing \r is not stripped: the name must match exactly.
        assert_eq!(
            forbidden(b"ccollections\r\nOrderedDict\n."),
            "collections\r.OrderedDict"
        );
        // Extension registry codes name globals indirectly.
        assert_eq!(
            forbidden(b"\x80\x02\x82\x01."),
            "<extension registry code 1>"
        );
    }

    #[test]
    fn pickle_stack_global_operands_via_memo_and_unresolved() {
        // Strings memoized then fetched with BINGET resolve.
        let ok = b"\x80\x04\x8c\x0bcollections\x94\x8c\x0bOrderedDict\x94h\x00h\x01\x93)R.";
        assert!(scan(ok, 0).is_ok());
        let bad = b"\x80\x04\x8c\x02os\x94\x8c\x06system\x94h\x00h\x01\x93.";
        assert_eq!(forbidden(bad), "os.system");
        // An int, or a call result, is not a string: fail closed.
        assert_eq!(
            forbidden(b"\x80\x04K\x01\x8c\x06system\x93."),
            "<unresolved STACK_GLOBAL>"
        );
        assert_eq!(
            forbidden(b"\x80\x04\x8c\x07_codecs\x8c\x06encode\x93\x8c\x01a\x8c\x06latin1\x86R\x8c\x01x\x93."),
            "<unresolved STACK_GLOBAL>"
        );
        // Protocol 0 STRING with escapes is not trusted as an operand either.
        assert_eq!(
            forbidden(b"S'o\\x73'\nS'system'\n\x93."),
            "<unresolved STACK_GLOBAL>"
        );
    }

    #[test]
    fn pickle_allowlist_wildcard_only_matches_identifiers() {
        assert!(is_allowed("numpy.dtypes", "Float64DType"));
        assert!(!is_allowed("numpy.dtypes", "DType"));
        assert!(!is_allowed(
            "numpy.dtypes",
            "Float64DType.__init__.fooDType"
        ));
        assert!(is_allowed("torch._utils", "_rebuild_tensor_v2"));
        assert!(!is_allowed("torch", "load"));
        assert!(!is_allowed("torch._utils", "_rebuild_tensor_v2 "));
    }

    #[test]
    fn pickle_sets_and_dicts_inside_state() {
        // {"s": {1, 2}} at protocol 2 (`__builtin__.set([1, 2])`).
        let set2 = b"\x80\x02}q\x00X\x01\x00\x00\x00sq\x01c__builtin__\nset\nq\x02]q\x03(K\x01K\x02e\x85q\x04Rq\x05s.";
        assert_eq!(
            ordered_names(set2),
            vec![("s.0".to_string(), 2), ("s.1".to_string(), 2)]
        );
    }

    #[test]
    fn pickle_cycles_and_memo_bombs_terminate() {
        // l = []; l.append(l)
        let cyc = b"\x80\x02]q\x00h\x00a.";
        assert!(ordered_names(cyc).is_empty());
        // (x, x) nested 40 times: 2^40 leaves if unfolded.
        let mut bomb = b"\x80\x02]".to_vec();
        for _ in 0..40 {
            bomb.extend_from_slice(b"2\x86");
        }
        bomb.push(b'.');
        let p = scan(&bomb, 0).unwrap();
        assert!(matches!(p.leaf_paths(), Err(ScanError::Malformed(_))));
    }

    #[test]
    fn pickle_repeated_copying_calls_are_bounded() {
        // A 1000-item list memoized once, then `set(list)` called 10_000 times for 6 bytes
        // each: 10M copied values if unbounded.
        let mut p = b"\x80\x02c__builtin__\nset\nq\x00](".to_vec();
        for _ in 0..1000 {
            p.extend_from_slice(b"K\x01");
        }
        p.extend_from_slice(b"e\x85q\x01");
        for _ in 0..10_000 {
            p.extend_from_slice(b"h\x00h\x01R0");
        }
        p.extend_from_slice(b"N.");
        match scan(&p, 0) {
            Err(ScanError::Malformed(m)) => assert!(m.contains("memo bomb"), "{m}"),
            other => panic!("expected the copy budget to stop the scan, got {other:?}"),
        }
    }

    #[test]
    fn pickle_truncation_and_garbage_never_panic() {
        for data in [OD0, OD2, OD4] {
            for n in 0..data.len() {
                assert!(scan(&data[..n], 0).is_err(), "prefix of {n} bytes");
            }
        }
        // Deterministic pseudo-random bytes, biased towards opcode bytes.
        let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
        let mut next = || {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x
        };
        let ops = b"(.0125FIJKLMNPQRSTUVXabcdeghijlopqrstu}])\x80\x81\x85\x86\x87\x88\x89\x8a\x8b\x8c\x8d\x8e\x8f\x90\x91\x92\x93\x94\x95\x96\x97\x98";
        for _ in 0..20_000 {
            let len = (next() % 64) as usize;
            let data: Vec<u8> = (0..len)
                .map(|_| {
                    let r = next();
                    if r % 3 == 0 {
                        (r >> 8) as u8
                    } else {
                        ops[(r >> 8) as usize % ops.len()]
                    }
                })
                .collect();
            if let Ok(p) = scan(&data, 0) {
                let _ = p.leaf_paths();
            }
        }
    }

    #[test]
    fn pickle_consecutive_pickles_report_their_end() {
        let mut two = OD2.to_vec();
        two.extend_from_slice(OD4);
        let a = scan(&two, 0).unwrap();
        assert_eq!(a.end, OD2.len());
        let b = scan(&two, a.end).unwrap();
        assert_eq!(b.end, two.len());
    }
}
