//! The per-node hot path of `qmtl_dagmanager.core.dag`, for the common shape of a node.
//!
//! The Python core is the reference. Every function here either returns exactly what the
//! Python code returns for a node, or declines the node (`None`), and Python then checks it
//! itself and raises the error that names the node and field. So this module never rejects
//! input: any shape it is not sure of (a bool where an int goes, a tag with spaces, a float
//! key, a non-ASCII key in params, a VersionSentinel) goes to Python.

use std::collections::HashSet;
use std::fmt::Write;

use pyo3::ffi;
use pyo3::AsPyPointer;
use pyo3::prelude::*;
use pyo3::types::{PyDict, PyList, PyString};

const NODE_ID_PREFIX: &str = "blake3:";
const TAG_QUERY_NODE: &str = "TagQueryNode";
const SENTINEL_TYPE: &str = "VersionSentinel";

fn exact_str(o: &PyAny) -> Option<&str> {
    // SAFETY: a type check on a live object the GIL holder borrows
    if unsafe { ffi::PyUnicode_CheckExact(o.as_ptr()) } == 0 {
        return None;
    }
    o.downcast::<PyString>().ok()?.to_str().ok() // lone surrogates: declined
}

fn is_int(o: &PyAny) -> bool {
    unsafe { ffi::PyLong_CheckExact(o.as_ptr()) != 0 } // bool is not an exact int
}

fn is_float(o: &PyAny) -> bool {
    unsafe { ffi::PyFloat_CheckExact(o.as_ptr()) != 0 }
}

fn is_bool(o: &PyAny) -> bool {
    unsafe { ffi::PyBool_Check(o.as_ptr()) != 0 }
}

fn exact_dict(o: &PyAny) -> Option<&PyDict> {
    if unsafe { ffi::PyDict_CheckExact(o.as_ptr()) } == 0 {
        return None;
    }
    o.downcast::<PyDict>().ok()
}

fn exact_list(o: &PyAny) -> Option<&PyList> {
    if unsafe { ffi::PyList_CheckExact(o.as_ptr()) } == 0 {
        return None;
    }
    o.downcast::<PyList>().ok()
}

/// `obj.get(key)`, with a JSON null read as missing (as the Python code's `is None`).
fn get<'p>(d: &'p PyDict, key: &PyString) -> Option<&'p PyAny> {
    d.get_item(key).filter(|v| !v.is_none())
}

/// A string Python's `strip()` leaves as it is, tested conservatively: it starts and ends with
/// printable ASCII other than space.
fn clean(s: &str) -> bool {
    match (s.as_bytes().first(), s.as_bytes().last()) {
        (Some(a), Some(b)) => a.is_ascii_graphic() && b.is_ascii_graphic(),
        _ => false,
    }
}

/// At most `max` characters (counted by bytes, which is never fewer).
fn short(s: &str, max: usize) -> bool {
    s.len() <= max
}

struct Keys<'p> {
    node_id: &'p PyString,
    node_type: &'p PyString,
    code_hash: &'p PyString,
    schema_hash: &'p PyString,
    schema_compat_id: &'p PyString,
    schema_id: &'p PyString,
    params: &'p PyString,
    config: &'p PyString,
    interval: &'p PyString,
    period: &'p PyString,
    bucket: &'p PyString,
    inputs: &'p PyString,
    dependencies: &'p PyString,
    tags: &'p PyString,
    name: &'p PyString,
    config_hash: &'p PyString,
    query_tags: &'p PyString,
    match_mode: &'p PyString,
    empty: &'p PyAny,
    any: &'p PyAny,
    all: &'p PyAny,
    context: Vec<String>,
}

impl<'p> Keys<'p> {
    fn new(py: Python<'p>, context: Vec<String>) -> Self {
        let k = |s| PyString::intern(py, s);
        Keys {
            node_id: k("node_id"),
            node_type: k("node_type"),
            code_hash: k("code_hash"),
            schema_hash: k("schema_hash"),
            schema_compat_id: k("schema_compat_id"),
            schema_id: k("schema_id"),
            params: k("params"),
            config: k("config"),
            interval: k("interval"),
            period: k("period"),
            bucket: k("bucket"),
            inputs: k("inputs"),
            dependencies: k("dependencies"),
            tags: k("tags"),
            name: k("name"),
            config_hash: k("config_hash"),
            query_tags: k("query_tags"),
            match_mode: k("match_mode"),
            empty: k(""),
            any: k("any"),
            all: k("all"),
            context,
        }
    }
}

#[derive(Clone, Copy)]
struct Limits {
    max_tags: usize,
    max_depth: usize,
    max_text: usize,
}

/// A non-negative exact int field (missing or null is 0): the object and its value.
/// A non-negative exact int field: the object (None when missing or null: 0) and its value.
fn int_field<'p>(d: &'p PyDict, key: &PyString) -> Option<(Option<&'p PyAny>, i64)> {
    match get(d, key) {
        None => Some((None, 0)),
        Some(v) if is_int(v) => {
            let x: i64 = v.extract().ok()?;
            (x >= 0).then_some((Some(v), x))
        }
        Some(_) => None,
    }
}

/// A hash field: a string of 1..=max_text characters that does not start with a space.
fn hash_field<'p>(d: &'p PyDict, key: &PyString, lim: &Limits) -> Option<(&'p PyAny, &'p str)> {
    let v = get(d, key)?;
    let s = exact_str(v)?;
    (short(s, lim.max_text) && s.as_bytes().first()?.is_ascii_graphic()).then_some((v, s))
}

/// An optional text field: a string as is (at most `max` characters, if given), or "".
fn text_field<'p>(
    d: &'p PyDict,
    key: &PyString,
    max: Option<usize>,
    keys: &Keys<'p>,
) -> Option<&'p PyAny> {
    match get(d, key) {
        None => Some(keys.empty),
        Some(v) => {
            let s = exact_str(v)?;
            max.map_or(true, |m| short(s, m)).then_some(v)
        }
    }
}

/// A list field that is missing, null or a list: `Some(None)` when missing, null or empty.
fn list_or_empty(v: Option<&PyAny>) -> Option<Option<&PyList>> {
    match v {
        None => Some(None),
        Some(o) => {
            let l = exact_list(o)?;
            Some((!l.is_empty()).then_some(l))
        }
    }
}

/// `inputs or dependencies`, each a non-empty string.
fn inputs<'p>(d: &'p PyDict, keys: &Keys) -> Option<Vec<&'p PyAny>> {
    let first = list_or_empty(get(d, keys.inputs))?;
    let deps = match first {
        Some(l) => Some(l),
        None => list_or_empty(get(d, keys.dependencies))?,
    };
    let mut out = Vec::new();
    if let Some(l) = deps {
        for item in l.iter() {
            let s = exact_str(item)?;
            if s.is_empty() {
                return None;
            }
            out.push(item);
        }
    }
    Some(out)
}

/// A list of clean tag strings (at most max_tags, each at most max_text characters).
fn tag_list<'p>(v: Option<&'p PyAny>, lim: &Limits) -> Option<Vec<&'p PyAny>> {
    let o = match v {
        Some(o) => o,
        None => return Some(Vec::new()),
    };
    let l = exact_list(o)?;
    if l.len() > lim.max_tags {
        return None;
    }
    let mut out = Vec::with_capacity(l.len());
    for item in l.iter() {
        let s = exact_str(item)?;
        if !(clean(s) && short(s, lim.max_text)) {
            return None;
        }
        out.push(item);
    }
    Some(out)
}

/// Whether a JSON value nests more than `limit` levels (dict/list only; others declined).
fn deeper_than(o: &PyAny, depth: usize, limit: usize) -> Option<bool> {
    if depth > limit {
        return Some(true);
    }
    let children: Vec<&PyAny> = if let Some(d) = exact_dict(o) {
        d.values().iter().collect()
    } else if let Some(l) = exact_list(o) {
        l.iter().collect()
    } else {
        return Some(false);
    };
    for c in children {
        let container = exact_dict(c).is_some() || exact_list(c).is_some();
        if !container && unsafe { ffi::PyDict_Check(c.as_ptr()) | ffi::PyList_Check(c.as_ptr()) } != 0 {
            return None; // a dict or list subclass: not a decoded document
        }
        if container && deeper_than(c, depth + 1, limit)? {
            return Some(true);
        }
    }
    Some(false)
}

fn escape(s: &str, out: &mut String) {
    out.push('"');
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            '\u{8}' => out.push_str("\\b"),
            '\u{c}' => out.push_str("\\f"),
            c if (c as u32) < 0x20 => {
                let _ = write!(out, "\\u{:04x}", c as u32);
            }
            c => out.push(c),
        }
    }
    out.push('"');
}

/// Whether an ASCII key is a context key (compared lower-cased, without allocating).
/// `context` is identity.CONTEXT_KEYS, passed in by the caller (one list for both paths).
fn dropped(key: &str, context: &[String]) -> bool {
    (key.len() >= 4 && key.as_bytes()[..4].eq_ignore_ascii_case(b"env_"))
        || context.iter().any(|k| k.eq_ignore_ascii_case(key))
}

/// identity.canonical_json(identity._strip_context(value)), or None to decline.
fn canon(o: &PyAny, out: &mut String, context: &[String]) -> Option<()> {
    if o.is_none() {
        out.push_str("null");
    } else if let Some(s) = exact_str(o) {
        escape(s, out);
    } else if is_bool(o) {
        out.push_str(if o.is_true().ok()? { "true" } else { "false" });
    } else if is_int(o) {
        match o.extract::<i64>() {
            Ok(v) => {
                let _ = write!(out, "{v}");
            }
            Err(_) => out.push_str(o.repr().ok()?.to_str().ok()?),
        }
    } else if is_float(o) {
        let r = o.repr().ok()?;
        let s = r.to_str().ok()?;
        if s.contains("inf") || s.contains("nan") {
            return None;
        }
        out.push_str(s);
    } else if let Some(l) = exact_list(o) {
        out.push('[');
        for (i, item) in l.iter().enumerate() {
            if i > 0 {
                out.push(',');
            }
            canon(item, out, context)?;
        }
        out.push(']');
    } else if let Some(d) = exact_dict(o) {
        let mut items: Vec<(&str, &PyAny)> = Vec::with_capacity(d.len());
        for (k, v) in d.iter() {
            let key = exact_str(k)?;
            if !key.is_ascii() {
                return None; // Python lower-cases by Unicode rules: leave it to Python
            }
            if !dropped(key, context) {
                items.push((key, v));
            }
        }
        items.sort_unstable_by(|a, b| a.0.cmp(b.0));
        out.push('{');
        for (i, (k, v)) in items.iter().enumerate() {
            if i > 0 {
                out.push(',');
            }
            escape(k, out);
            out.push(':');
            canon(v, out, context)?;
        }
        out.push('}');
    } else {
        return None;
    }
    Some(())
}

/// What a TagQueryNode asks for: (sorted unique query tags, match mode, interval).
fn tag_query<'p>(
    d: &'p PyDict,
    keys: &Keys,
    lim: &Limits,
) -> Option<(Vec<(&'p str, &'p PyAny)>, &'static str, i64)> {
    let params = match get(d, keys.params) {
        Some(p) => Some(p),
        None => get(d, keys.config),
    };
    let p = match params {
        None => None,
        Some(o) => Some(exact_dict(o)?),
    };
    let from_p = |k: &PyString| p.and_then(|p| get(p, k));
    let raw = from_p(keys.query_tags)
        .or_else(|| from_p(keys.tags))
        .or_else(|| get(d, keys.tags));
    let listed = tag_list(raw, &Limits { max_tags: usize::MAX, ..*lim })?;
    let mut tags: Vec<(&str, &PyAny)> =
        listed.iter().map(|t| (exact_str(t).unwrap_or(""), *t)).collect();
    tags.sort_unstable_by(|a, b| a.0.cmp(b.0));
    tags.dedup_by(|a, b| a.0 == b.0);
    if tags.is_empty() {
        return None;
    }
    let mode = match from_p(keys.match_mode).or_else(|| get(d, keys.match_mode)) {
        None => "any",
        Some(m) => match exact_str(m)? {
            "any" => "any",
            "all" => "all",
            _ => return None,
        },
    };
    let interval = match get(d, keys.interval).or_else(|| from_p(keys.interval)) {
        Some(v) if is_int(v) => v.extract::<i64>().ok()?,
        _ => return None,
    };
    (interval > 0).then_some((tags, mode, interval))
}

/// A node read natively: its 16 fields as owned references, to become a Node.
struct Read<'p> {
    fields: [*mut ffi::PyObject; 16],
    id: &'p str,
    inputs: Vec<&'p str>,
}

/// One compute node as dag._node builds it, or None to leave it to Python.
fn read_node<'p>(
    raw: &'p PyAny,
    index: usize,
    verify: bool,
    lim: &Limits,
    keys: &Keys<'p>,
) -> Option<Read<'p>> {
    let d = exact_dict(raw)?;
    let nid_obj = get(d, keys.node_id)?;
    let nid = exact_str(nid_obj)?;
    let hex = nid.strip_prefix(NODE_ID_PREFIX)?;
    if hex.len() != 64 || !hex.bytes().all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b)) {
        return None;
    }
    let type_obj = get(d, keys.node_type)?;
    let node_type = exact_str(type_obj)?;
    if node_type.is_empty() || !short(node_type, lim.max_text) || node_type == SENTINEL_TYPE {
        return None;
    }
    let (code_obj, code_hash) = hash_field(d, keys.code_hash, lim)?;
    let (schema_obj, _) = hash_field(d, keys.schema_hash, lim)?;
    if get(d, keys.schema_id).is_some() {
        return None;
    }
    let compat_obj = get(d, keys.schema_compat_id)?;
    let compat = exact_str(compat_obj)?;
    if !(clean(compat) && short(compat, lim.max_text)) {
        return None;
    }
    for key in [keys.params, keys.config] {
        if let Some(v) = get(d, key) {
            if (exact_dict(v).is_some() || exact_list(v).is_some())
                && deeper_than(v, 1, lim.max_depth)?
            {
                return None;
            }
        }
    }
    let (interval_obj, interval) = int_field(d, keys.interval)?;
    let (period_obj, period) = int_field(d, keys.period)?;
    let (bucket_obj, _) = int_field(d, keys.bucket)?;
    let config_hash = text_field(d, keys.config_hash, None, keys)?;
    let name = text_field(d, keys.name, Some(lim.max_text), keys)?;
    let deps = inputs(d, keys)?;
    let tags = tag_list(get(d, keys.tags), lim)?;
    let is_query = node_type == TAG_QUERY_NODE;
    let query = if is_query { Some(tag_query(d, keys, lim)?) } else { None };
    if verify {
        let mut pre = String::with_capacity(256);
        let _ = write!(pre, "{node_type}|{interval}|{period}|");
        match &query {
            Some((qt, mode, qi)) => {
                let _ = write!(pre, "{{\"interval\":{qi},\"match_mode\":\"{mode}\",\"query_tags\":[");
                for (i, (t, _)) in qt.iter().enumerate() {
                    if i > 0 {
                        pre.push(',');
                    }
                    escape(t, &mut pre);
                }
                pre.push_str("]}");
            }
            None => match get(d, keys.params).or_else(|| get(d, keys.config)) {
                None => pre.push_str("null"),
                Some(p) => canon(p, &mut pre, &keys.context)?,
            },
        }
        pre.push('|');
        let mut ids: Vec<&str> = deps.iter().map(|x| exact_str(x).unwrap_or("")).collect();
        ids.sort_unstable();
        for (i, id) in ids.iter().enumerate() {
            if i > 0 {
                pre.push(',');
            }
            pre.push_str(id);
        }
        let _ = write!(pre, "|{compat}|{code_hash}");
        if blake3::hash(pre.as_bytes()).to_hex().as_str() != hex {
            return None; // Python reports the mismatch
        }
    }
    // The Node's 16 fields as owned references (borrowed ones are increfed), in order.
    let own = |o: &PyAny| {
        let p = o.as_ptr();
        unsafe { ffi::Py_INCREF(p) };
        p
    };
    let int_or_zero = |o: Option<&PyAny>| match o {
        Some(v) => own(v),
        None => unsafe { ffi::PyLong_FromLong(0) },
    };
    let tuple_of = |items: &[&PyAny]| unsafe {
        let t = ffi::PyTuple_New(items.len() as ffi::Py_ssize_t);
        for (i, o) in items.iter().enumerate() {
            ffi::PyTuple_SET_ITEM(t, i as ffi::Py_ssize_t, own(o));
        }
        t
    };
    let (interval_out, mode, query_tags) = match &query {
        Some((qt, mode, qi)) => {
            let objs: Vec<&PyAny> = qt.iter().map(|(_, o)| *o).collect();
            let mode_obj = if *mode == "all" { keys.all } else { keys.any };
            (unsafe { ffi::PyLong_FromLongLong(*qi) }, own(mode_obj), tuple_of(&objs))
        }
        None => (int_or_zero(interval_obj), own(keys.any), tuple_of(&[])),
    };
    let fields = [
        own(nid_obj),
        own(type_obj),
        interval_out,
        int_or_zero(period_obj),
        tuple_of(&deps),
        own(code_obj),
        own(schema_obj),
        own(compat_obj),
        own(config_hash),
        own(name),
        tuple_of(&tags),
        int_or_zero(bucket_obj),
        mode,
        query_tags,
        unsafe { ffi::PyLong_FromSsize_t(index as ffi::Py_ssize_t) },
        own(raw),
    ];
    let inputs = deps.iter().map(|x| exact_str(x).unwrap_or("")).collect();
    Some(Read { fields, id: nid, inputs })
}

/// The compute nodes of a decoded `nodes` list, in order, each a `node_cls` built with
/// its 16 fields, or None where Python must read the node itself (a
/// VersionSentinel, an unusual shape, an error). Returns (nodes, how many are None), or None
/// when a node id appears twice (Python handles duplicates).
#[pyfunction]
#[allow(clippy::too_many_arguments)]
fn read_nodes(
    py: Python<'_>,
    raw_nodes: &PyList,
    verify: bool,
    max_tags: usize,
    max_depth: usize,
    max_text: usize,
    node_cls: &PyAny,
    context_keys: Vec<String>,
) -> PyResult<Option<(Vec<PyObject>, usize, Option<Vec<usize>>)>> {
    let tp = node_cls.as_ptr() as *mut ffi::PyTypeObject;
    let is_tuple_type = unsafe {
        ffi::PyType_Check(node_cls.as_ptr()) != 0
            && ffi::PyType_IsSubtype(tp, std::ptr::addr_of_mut!(ffi::PyTuple_Type)) != 0
    };
    if !is_tuple_type {
        return Err(pyo3::exceptions::PyTypeError::new_err("node_cls must be a tuple type"));
    }
    let alloc = unsafe { (*tp).tp_alloc }.unwrap_or(ffi::PyType_GenericAlloc);
    let lim = Limits { max_tags, max_depth, max_text };
    let keys = Keys::new(py, context_keys);
    let mut seen: HashSet<&str> = HashSet::with_capacity(raw_nodes.len());
    let mut out = Vec::with_capacity(raw_nodes.len());
    let mut declined = 0;
    let mut ids: Vec<&str> = Vec::with_capacity(raw_nodes.len());
    let mut edges: Vec<Vec<&str>> = Vec::with_capacity(raw_nodes.len());
    for (index, raw) in raw_nodes.iter().enumerate() {
        if let Some(d) = exact_dict(raw) {
            if let Some(id) = get(d, keys.node_id).and_then(exact_str) {
                if !seen.insert(id) {
                    return Ok(None);
                }
            }
        }
        match read_node(raw, index, verify, &lim, &keys) {
            Some(read) => {
                debug_assert!(seen.contains(read.id));
                ids.push(read.id);
                edges.push(read.inputs);
                // as tuple.__new__(Node, fields) does, without the intermediate tuple
                let obj = unsafe { alloc(tp, 16) };
                if obj.is_null() {
                    for f in read.fields {
                        unsafe { ffi::Py_DECREF(f) };
                    }
                    return Err(PyErr::fetch(py));
                }
                for (i, f) in read.fields.into_iter().enumerate() {
                    unsafe { ffi::PyTuple_SET_ITEM(obj, i as ffi::Py_ssize_t, f) }; // steals
                }
                out.push(unsafe { PyObject::from_owned_ptr(py, obj) });
            }
            None => {
                declined += 1;
                out.push(py.None());
            }
        }
    }
    let order = if declined == 0 { order_of(&ids, &edges) } else { None };
    Ok(Some((out, declined, order)))
}

/// dag.topological_order of nodes whose inputs are all among them (Kahn's algorithm, the same
/// traversal, so the same order); None when an input is unknown or there is a cycle (Python
/// reports either).
fn order_of(ids: &[&str], edges: &[Vec<&str>]) -> Option<Vec<usize>> {
    let position: std::collections::HashMap<&str, usize> =
        ids.iter().enumerate().map(|(i, id)| (*id, i)).collect();
    let mut indegree = vec![0usize; ids.len()];
    let mut children: Vec<Vec<usize>> = vec![Vec::new(); ids.len()];
    for (i, deps) in edges.iter().enumerate() {
        for dep in deps {
            let j = *position.get(dep)?;
            indegree[i] += 1;
            children[j].push(i);
        }
    }
    let mut ready: Vec<usize> = (0..ids.len()).filter(|i| indegree[*i] == 0).collect();
    let mut order = Vec::with_capacity(ids.len());
    while let Some(i) = ready.pop() {
        order.push(i);
        for &c in &children[i] {
            indegree[c] -= 1;
            if indegree[c] == 0 {
                ready.push(c);
            }
        }
    }
    (order.len() == ids.len()).then_some(order)
}

/// The compute key of every node id in one context: BLAKE3 of `<id><suffix>`, as
/// `blake3:<hex>` (plan._compute_key for queue generation 0).
#[pyfunction]
fn compute_keys(node_ids: Vec<&str>, suffix: &str) -> Vec<String> {
    let mut text = String::with_capacity(160);
    node_ids
        .iter()
        .map(|id| {
            text.clear();
            text.push_str(id);
            text.push_str(suffix);
            format!("{NODE_ID_PREFIX}{}", blake3::hash(text.as_bytes()).to_hex())
        })
        .collect()
}

#[pymodule]
fn qmtl_native(_py: Python<'_>, m: &PyModule) -> PyResult<()> {
    m.add_function(wrap_pyfunction!(read_nodes, m)?)?;
    m.add_function(wrap_pyfunction!(compute_keys, m)?)?;
    Ok(())
}
