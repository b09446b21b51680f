//! Procedural macros of charmrs.
//!
//! [`chare`] turns an `impl` block into a chare type: it implements `charmrs::Chare` (from the
//! block's `new`), one `charmrs::Entry` marker per `#[entry]` method (with a compile-time id
//! registered in the entry table), and a `<Type>Proxy` trait that gives every proxy of the type
//! (element, group, array, single chare) one method per entry. No interface file, no translator.
//! [`task`] registers a function the task pool can run on any PE.
//!
//! These macros are used through the `charmrs` crate (`use charmrs::prelude::*;` brings
//! `chare`; `task` is `charmrs::task`), whose crate documentation has runnable examples of every
//! form described here.

use proc_macro::TokenStream;
use proc_macro2::{Span, TokenStream as TokenStream2};
use quote::{format_ident, quote, quote_spanned};
use syn::punctuated::Punctuated;
use syn::spanned::Spanned;
use syn::visit_mut::VisitMut;
use syn::{
    parse_macro_input, BinOp, Expr, FnArg, Ident, ImplItem, ImplItemFn, ItemImpl, Lit,
    MetaNameValue, Pat, ReturnType, Token, Type,
};

/// Makes the `impl` block of a type a chare.
///
/// The block must have `fn new([ctx: &Ctx<Self>,] args…) -> Self` (the constructor) and marks
/// entry methods with `#[entry]`: `fn name(&mut self, [ctx: &Ctx<Self>,] args…)`. Argument types
/// must be `charmrs::Payload` (`Clone + Send + Serialize + DeserializeOwned + 'static`) and are
/// taken by value. Other methods of the block stay ordinary methods.
///
/// # Forms
///
/// * `#[chare]` or `#[chare(migratable)]` on the block. A migratable chare's elements can move
///   between PEs (`ctx.migrate(pe)`, load balancing) and be checkpointed: the type must derive
///   `Serialize` and `Deserialize` (its state travels serialized). Only such a block may have a
///   hook `fn migrated(&mut self, ctx: &Ctx<Self>)` (no `#[entry]`), which runs on the new PE
///   after a move or a restore, before any message is delivered there.
/// * Constructor: `fn new([ctx: &Ctx<Self>,] args…) -> Self`, or suspendable:
///   `async fn new([ctx: Ctx<Self>,] args…) -> Self` (the context by value); calls for the
///   element wait until it is built. Arguments are passed at creation as a tuple:
///   `Array::<Type, usize>::new(n, (a, b))`, `()` for none.
/// * Entry receivers: `&mut self` or `&self`, optionally followed by `ctx: &Ctx<Self>`.
/// * Suspendable entry: `#[entry] async fn name(this: Coro<Self>, args…)`; it reaches its state
///   with `this.with(|state, ctx| …)` and its context with `this.ctx()`, and may await
///   (`this.wait(|state| cond).await`, futures, `charmrs::sleep`) while the element's other
///   entries run.
/// * Conditional delivery: `#[entry(when = "self.iter == iter")]`, any boolean expression over
///   `self` and the arguments; the message waits at the element until it holds. The exact form
///   `self.field == arg` (either order) is looked up by hash (both sides of one `Hash` type);
///   parenthesise it to have it tested message by message.
/// * Return values: `fn name(&self, …) -> R` (`R: Payload`). A plain call discards the value;
///   `proxy.at(i).ret().name(…)` returns a `Future<R>`, and on a collection `proxy.ret().name(…)`
///   a `Future<()>` of completion and `proxy.gather().name(…)` a `Future<Vec<R>>` by index.
///
/// # Generated
///
/// `impl Chare for Type`, an `Entry` marker per entry, and a trait `TypeProxy` with, for each
/// entry `name`, a method `name(args…)` (calling it on a collection broadcasts) and a method
/// `name_callback()` giving the entry as a `charmrs::Callback` (a reduction target, or a value
/// passed to other chares). The trait is implemented for every proxy to `Type`, and its methods
/// resolve only where it is in scope: in the module of the block, or after
/// `use path::to::TypeProxy;` elsewhere.
///
/// # Refused entry names
///
/// An entry may not be named like an inherent method of a proxy type (`index`, `pe`, `ret`,
/// `at`, `try_at`, `shape`, `id`, `gather`, `dims`, `insert`, `section`, `with_priority`, `len`,
/// …; the full list is `PROXY_METHODS` in this crate's source): the proxy's own method would win
/// over the generated trait's and the call would send nothing. Nor may an entry be named
/// `<other entry>_callback`, a generated name. Both are compile errors at the entry's name:
///
/// ```compile_fail
/// use charmrs::prelude::*;
///
/// struct Cell;
///
/// #[chare]
/// impl Cell {
///     fn new() -> Self { Cell }
///
///     #[entry]
///     fn index(&mut self) {}   // error: entry `index` would be hidden by `ElementProxy::index`
/// }
/// # fn main() {}
/// ```
///
/// ```compile_fail
/// use charmrs::prelude::*;
///
/// struct Cell;
///
/// #[chare]
/// impl Cell {
///     fn new() -> Self { Cell }
///
///     #[entry]
///     fn done(&mut self) {}
///
///     #[entry]
///     fn done_callback(&mut self) {}   // error: the name of the callback of `done`
/// }
/// # fn main() {}
/// ```
///
/// The same block with other names compiles:
///
/// ```
/// use charmrs::prelude::*;
///
/// struct Cell;
///
/// #[chare]
/// impl Cell {
///     fn new() -> Self { Cell }
///
///     #[entry]
///     fn my_index(&mut self) {}
///
///     #[entry]
///     fn done(&mut self) {}
///
///     #[entry]
///     fn finished(&mut self) {}
/// }
/// # fn main() {}
/// ```
///
/// `Self` may appear in argument and return types (`n: ElementProxy<Self>`, `-> Vec<Self>`), and
/// an entry under `#[cfg(...)]` (or `#[cfg_attr(p, cfg(...))]`) has all its generated items under
/// the same condition.
///
/// # Example
///
/// The example below is not compiled here (it needs a running job); the crate documentation of
/// `charmrs` has a runnable one.
///
/// ```ignore
/// use charmrs::prelude::*;
///
/// #[derive(Serialize, Deserialize)]
/// struct Cell { iter: u32, sum: f64 }
///
/// #[chare(migratable)]
/// impl Cell {
///     async fn new(ctx: Ctx<Self>, start: f64) -> Self {    // suspendable constructor
///         Cell { iter: 0, sum: start + ctx.index::<usize>() as f64 }
///     }
///
///     fn migrated(&mut self, ctx: &Ctx<Self>) {}            // after a move, on the new PE
///
///     #[entry(when = "self.iter == iter")]                    // delivered in iteration order
///     fn step(&mut self, iter: u32, x: f64) { self.sum += x; self.iter += 1; }
///
///     #[entry]
///     fn sum(&self) -> f64 { self.sum }                       // `cells.at(0).ret().sum().await`
///
///     #[entry]
///     async fn finish(this: Coro<Self>, steps: u32, done: Callback<(f64,)>) {
///         this.wait(|s| s.iter == steps).await;               // other entries run meanwhile
///         let sum = this.with(|s, _ctx| s.sum);
///         this.ctx().contribute(sum, Reducer::Sum, done);
///     }
///
///     #[entry]
///     fn total(&mut self, total: f64) { println!("{total}"); }
/// }
///
/// // In an async context on a PE:
/// let cells = Array::<Cell, usize>::new(4, (1.0,));
/// cells.finish(1, cells.at(0).total_callback());              // `<entry>_callback()`
/// cells.step(0, 2.0);                                         // broadcast
/// ```
#[proc_macro_attribute]
pub fn chare(attr: TokenStream, item: TokenStream) -> TokenStream {
    let migratable = match attr.to_string().trim() {
        "" => false,
        "migratable" => true,
        other => {
            return syn::Error::new(
                Span::call_site(),
                format!("#[chare] takes no argument or `migratable`, not `{other}`"),
            )
            .to_compile_error()
            .into()
        }
    };
    let mut block = parse_macro_input!(item as ItemImpl);
    match expand(&mut block, migratable) {
        Ok(ts) => ts.into(),
        Err(e) => e.to_compile_error().into(),
    }
}

/// A parsed method signature: does it take `ctx`, and its message arguments.
struct Signature {
    has_ctx: bool,
    names: Vec<Ident>,
    types: Vec<Type>,
}

fn is_named_type(ty: &Type, name: &str) -> bool {
    match ty {
        Type::Path(p) => p.path.segments.last().is_some_and(|s| s.ident == name),
        _ => false,
    }
}

fn is_ctx_type(ty: &Type) -> bool {
    match ty {
        Type::Reference(r) => is_named_type(&r.elem, "Ctx"),
        _ => false,
    }
}

/// One `#[entry]` method as parsed.
struct EntrySig {
    method: Ident,
    sig: Signature,
    output: TokenStream2,
    docs: Vec<syn::Attribute>,
    /// The method's `#[cfg]` conditions (its `#[cfg_attr(p, cfg(q))]` as `#[cfg(any(not(p), q))]`),
    /// put on every item generated for the entry.
    cfgs: Vec<TokenStream2>,
    is_async: bool,
    /// The condition and the span of its string literal.
    when: Option<(Expr, Span)>,
}

/// The inherent methods (with a `self` receiver) of the types the generated `<Type>Proxy` trait
/// is implemented for (every `charmrs::ProxyTarget`: `ElementProxy`, `Proxy`, `Group`, `Array`,
/// `Single`, `Section`, `Ret<…>`, `Gather<…>`), as (type, method). Method-call resolution
/// prefers an inherent method to a trait method, so an entry with one of these names would never
/// be sent from that proxy type (`array.at(0).index()` returns the element's `Index`), and
/// `#[chare]` refuses the name instead.
///
/// Where it comes from: the `pub fn`s taking `self` in the inherent `impl` blocks of those types
/// in runtime/src/proxy.rs, runtime/src/section.rs and runtime/src/local_branch.rs
/// (`Single`, `Ret` and `Gather` have none; associated functions without `self`, such as
/// `Array::new`, cannot hide a method call). Methods private to the runtime do not hide (rustc
/// skips an inaccessible inherent method), and a trait method of the same name (`Clone::clone`,
/// `ProxyTarget::send_entry`) makes a call ambiguous, an error, rather than silently hidden.
/// runtime/tests/macro_names.rs compares this list with those sources: a method added to a
/// proxy type there fails that test until it is listed here.
const PROXY_METHODS: &[(&str, &str)] = &[
    // runtime/src/proxy.rs
    ("ElementProxy", "index"),
    ("ElementProxy", "pe"),
    ("ElementProxy", "with_priority"),
    ("ElementProxy", "ret"),
    ("Proxy", "shape"),
    ("Proxy", "id"),
    ("Proxy", "with_priority"),
    ("Proxy", "try_at"),
    ("Proxy", "at"),
    ("Proxy", "ret"),
    ("Proxy", "gather"),
    ("Group", "try_at"),
    ("Group", "at"),
    ("Array", "dims"),
    ("Array", "insert"),
    ("Array", "try_insert"),
    ("Array", "done_inserting"),
    ("Array", "try_at"),
    ("Array", "at"),
    // runtime/src/section.rs
    ("Proxy", "try_section"),
    ("Proxy", "section"),
    ("Array", "section"),
    ("Group", "section"),
    ("Section", "parts"),
    ("Section", "len"),
    ("Section", "is_empty"),
    ("Section", "contains"),
    ("Section", "with_priority"),
    // runtime/src/local_branch.rs
    ("ElementProxy", "with_local"),
    ("Group", "with_local"),
];

/// Expands to [`PROXY_METHODS`] as a `&[(&str, &str)]` of (type, method): the list of entry
/// names `#[chare]` refuses, for the runtime's test that checks it against the proxy types.
#[doc(hidden)]
#[proc_macro]
pub fn __proxy_method_names(input: TokenStream) -> TokenStream {
    if !input.is_empty() {
        return syn::Error::new(Span::call_site(), "takes no arguments")
            .to_compile_error()
            .into();
    }
    let pairs = PROXY_METHODS.iter().map(|(ty, m)| quote!((#ty, #m)));
    quote!(&[#(#pairs),*] as &[(&str, &str)]).into()
}

/// Refuses an entry name that an inherent proxy method would hide (see [`PROXY_METHODS`]).
fn check_entry_name(method: &Ident) -> syn::Result<()> {
    let name = method.to_string();
    let hiders: Vec<String> = PROXY_METHODS
        .iter()
        .filter(|(_, m)| *m == name)
        .map(|(ty, m)| format!("`{ty}::{m}`"))
        .collect();
    if hiders.is_empty() {
        return Ok(());
    }
    let (what, list) = if hiders.len() == 1 {
        ("method", hiders[0].clone())
    } else {
        ("methods", hiders.join(", "))
    };
    Err(syn::Error::new(
        method.span(),
        format!(
            "entry `{name}` would be hidden by the proxy {what} {list} (an inherent method wins \
             over the generated trait's, so the call would send nothing); rename the entry"
        ),
    ))
}

/// The `#[cfg]` conditions of a method, as `#[cfg(...)]` attributes to put on generated items.
/// `#[cfg_attr(p, cfg(q))]` becomes `#[cfg(any(not(p), q))]`; the other attributes a `cfg_attr`
/// may add (`inline`, lints, docs) belong to the method alone and are not copied.
fn cfg_attrs(attrs: &[syn::Attribute]) -> syn::Result<Vec<TokenStream2>> {
    let mut out = Vec::new();
    for a in attrs {
        if a.path().is_ident("cfg") {
            out.push(quote!(#a));
        } else if a.path().is_ident("cfg_attr") {
            let list = a.meta.require_list()?;
            cfg_attr_conditions(quote!(all()), list, &mut out)?;
        }
    }
    Ok(out)
}

/// Adds the conditions of `cfg_attr(p, attrs…)` (itself applying when `outer` holds).
fn cfg_attr_conditions(
    outer: TokenStream2,
    list: &syn::MetaList,
    out: &mut Vec<TokenStream2>,
) -> syn::Result<()> {
    let metas = list.parse_args_with(Punctuated::<syn::Meta, Token![,]>::parse_terminated)?;
    let mut metas = metas.into_iter();
    let Some(pred) = metas.next() else {
        return Err(syn::Error::new(list.span(), "`cfg_attr` needs a predicate"));
    };
    let when = quote!(all(#outer, #pred));
    for m in metas {
        if m.path().is_ident("cfg") {
            let inner = &m.require_list()?.tokens;
            out.push(quote!(#[cfg(any(not(#when), all(#inner)))]));
        } else if m.path().is_ident("cfg_attr") {
            cfg_attr_conditions(when.clone(), m.require_list()?, out)?;
        }
    }
    Ok(())
}

/// Rewrites `Self` in a type (or a path in it: `Self::N`, `Vec<Self>`) to the chare's type: the
/// argument and return types of an entry are copied into items where `Self` is something else
/// (an entry marker, a proxy type).
struct ReplaceSelf<'a>(&'a syn::Path);

impl VisitMut for ReplaceSelf<'_> {
    fn visit_path_mut(&mut self, path: &mut syn::Path) {
        if path.leading_colon.is_none()
            && path
                .segments
                .first()
                .is_some_and(|s| s.ident == "Self" && s.arguments.is_none())
        {
            let mut new = self.0.clone();
            new.segments.extend(path.segments.iter().skip(1).cloned());
            *path = new;
        }
        syn::visit_mut::visit_path_mut(self, path);
    }
}

fn parse_args<'a>(inputs: impl Iterator<Item = &'a FnArg>) -> syn::Result<Signature> {
    let mut sig = Signature {
        has_ctx: false,
        names: Vec::new(),
        types: Vec::new(),
    };
    for (k, arg) in inputs.enumerate() {
        let FnArg::Typed(pt) = arg else {
            return Err(syn::Error::new(arg.span(), "unexpected `self` here"));
        };
        if k == 0 && is_ctx_type(&pt.ty) {
            sig.has_ctx = true;
            continue;
        }
        if let Type::Reference(_) = &*pt.ty {
            return Err(syn::Error::new(
                pt.ty.span(),
                "entry and constructor arguments are moved to the receiver: take them by value \
                 (a reference cannot travel in a message)",
            ));
        }
        let name = match &*pt.pat {
            Pat::Ident(pi) => pi.ident.clone(),
            _ => format_ident!("arg{}", k),
        };
        sig.names.push(name);
        sig.types.push((*pt.ty).clone());
    }
    Ok(sig)
}

/// Removes `#[entry]` / `#[entry(when = "...")]`; returns whether it was there and the condition
/// (with the span of its string).
fn take_entry_attr(f: &mut ImplItemFn) -> syn::Result<(bool, Option<(Expr, Span)>)> {
    let Some(pos) = f.attrs.iter().position(|a| a.path().is_ident("entry")) else {
        return Ok((false, None));
    };
    let attr = f.attrs.remove(pos);
    if matches!(attr.meta, syn::Meta::Path(_)) {
        return Ok((true, None));
    }
    let pairs = attr.parse_args_with(Punctuated::<MetaNameValue, Token![,]>::parse_terminated)?;
    let mut when = None;
    for pair in pairs {
        if !pair.path.is_ident("when") {
            return Err(syn::Error::new(
                pair.path.span(),
                "the only #[entry] option is `when = \"condition\"`",
            ));
        }
        let Expr::Lit(syn::ExprLit {
            lit: Lit::Str(text),
            ..
        }) = &pair.value
        else {
            return Err(syn::Error::new(
                pair.value.span(),
                "`when` takes a string: when = \"self.x == x\"",
            ));
        };
        // The condition's tokens are located at the string (errors point there) but resolve as
        // at the call site, as the method they go into: a string a `macro_rules!` passed on
        // carries that macro's hygiene, under which `self` and the arguments are not in scope.
        let span = text.span().resolved_at(Span::call_site());
        let expr: Expr = text
            .parse::<TokenStream2>()
            .and_then(|tokens| syn::parse2(respan(tokens, span)))
            .map_err(|e| {
                syn::Error::new(
                    text.span(),
                    format!("`when` condition is not an expression: {e}"),
                )
            })?;
        when = Some((expr, span));
    }
    Ok((true, when))
}

/// `tokens` with every token (and group) given `span`.
fn respan(tokens: TokenStream2, span: Span) -> TokenStream2 {
    tokens
        .into_iter()
        .map(|tree| match tree {
            proc_macro2::TokenTree::Group(g) => {
                let mut group = proc_macro2::Group::new(g.delimiter(), respan(g.stream(), span));
                group.set_span(span);
                proc_macro2::TokenTree::Group(group)
            }
            mut other => {
                other.set_span(span);
                other
            }
        })
        .collect()
}

/// Rewrites uses of argument `names` in a `when` condition to `(*name)`: the condition sees the
/// buffered arguments by reference.
struct DerefArgs<'a>(&'a [Ident]);

impl VisitMut for DerefArgs<'_> {
    fn visit_expr_mut(&mut self, e: &mut Expr) {
        if let Expr::Path(p) = e {
            if p.qself.is_none() {
                if let Some(id) = p.path.get_ident() {
                    if self.0.contains(id) {
                        let id = id.clone();
                        *e = syn::parse_quote!((*#id));
                        return;
                    }
                }
            }
        }
        syn::visit_mut::visit_expr_mut(self, e);
    }
}

/// If `cond` is `self.field == arg` (either order), the field expression and the argument's
/// position: such conditions are matched by hash lookup.
fn equality_key(cond: &Expr, names: &[Ident]) -> Option<(Expr, usize)> {
    let Expr::Binary(b) = cond else { return None };
    if !matches!(b.op, BinOp::Eq(_)) {
        return None;
    }
    let on_self = |e: &Expr| {
        let mut cur = e;
        loop {
            match cur {
                Expr::Field(f) => cur = &f.base,
                Expr::Path(p) => return p.path.is_ident("self") && !matches!(e, Expr::Path(_)),
                _ => return false,
            }
        }
    };
    let arg_pos = |e: &Expr| match e {
        Expr::Path(p) => p
            .path
            .get_ident()
            .and_then(|id| names.iter().position(|n| n == id)),
        _ => None,
    };
    if on_self(&b.left) {
        arg_pos(&b.right).map(|k| ((*b.left).clone(), k))
    } else if on_self(&b.right) {
        arg_pos(&b.left).map(|k| ((*b.right).clone(), k))
    } else {
        None
    }
}

fn expand(block: &mut ItemImpl, migratable: bool) -> syn::Result<TokenStream2> {
    if let Some((_, path, _)) = &block.trait_ {
        return Err(syn::Error::new(
            path.span(),
            "#[chare] goes on an inherent impl block",
        ));
    }
    if !block.generics.params.is_empty() {
        return Err(syn::Error::new(
            block.generics.span(),
            "generic chare types are not supported",
        ));
    }
    let ty = (*block.self_ty).clone();
    let Type::Path(tp) = &ty else {
        return Err(syn::Error::new(ty.span(), "#[chare] needs a named type"));
    };
    let type_ident = tp
        .path
        .segments
        .last()
        .expect("a path has a segment")
        .ident
        .clone();
    let self_path = tp.path.clone();
    let type_name = type_ident.to_string();
    let proxy_trait = format_ident!("{}Proxy", type_ident);

    let mut ctor: Option<(Signature, bool)> = None;
    let mut entries = Vec::new();
    let mut has_migrated_hook = false;
    for item in &mut block.items {
        let ImplItem::Fn(f) = item else { continue };
        let (is_entry, when) = take_entry_attr(f)?;
        if !is_entry && f.sig.ident == "migrated" {
            if !migratable {
                return Err(syn::Error::new(
                    f.sig.span(),
                    "a `migrated` hook needs `#[chare(migratable)]`",
                ));
            }
            has_migrated_hook = true;
        }
        if !is_entry && f.sig.ident == "new" {
            if f.sig.receiver().is_some() {
                return Err(syn::Error::new(
                    f.sig.span(),
                    "the constructor `new` takes no `self`",
                ));
            }
            if matches!(f.sig.output, ReturnType::Default) {
                return Err(syn::Error::new(
                    f.sig.span(),
                    "the constructor `new` must return Self",
                ));
            }
            let is_async = f.sig.asyncness.is_some();
            let sig = match f.sig.inputs.first() {
                Some(FnArg::Typed(pt)) if is_async && is_named_type(&pt.ty, "Ctx") => {
                    let mut sig = parse_args(f.sig.inputs.iter().skip(1))?;
                    sig.has_ctx = true;
                    sig
                }
                Some(FnArg::Typed(pt)) if is_async && is_ctx_type(&pt.ty) => {
                    return Err(syn::Error::new(
                        pt.ty.span(),
                        "an `async fn new` takes its context by value: `ctx: Ctx<Self>`",
                    ))
                }
                _ => parse_args(f.sig.inputs.iter())?,
            };
            let mut sig = sig;
            for t in &mut sig.types {
                ReplaceSelf(&self_path).visit_type_mut(t);
            }
            ctor = Some((sig, is_async));
        } else if is_entry {
            check_entry_name(&f.sig.ident)?;
            if !f.sig.generics.params.is_empty() {
                return Err(syn::Error::new(
                    f.sig.generics.span(),
                    "entry methods cannot be generic",
                ));
            }
            let is_async = f.sig.asyncness.is_some();
            let args = if is_async {
                match f.sig.inputs.first() {
                    Some(FnArg::Typed(pt)) if is_named_type(&pt.ty, "Coro") => {}
                    _ => {
                        return Err(syn::Error::new(
                            f.sig.span(),
                            "a suspendable (async) entry method takes `this: Coro<Self>` first",
                        ))
                    }
                }
                let sig = parse_args(f.sig.inputs.iter().skip(1))?;
                if sig.has_ctx {
                    return Err(syn::Error::new(
                        f.sig.span(),
                        "an async entry reaches its context through `this.ctx()`, not a `ctx` argument",
                    ));
                }
                sig
            } else {
                match f.sig.inputs.first() {
                    Some(FnArg::Receiver(r)) if r.reference.is_some() => {}
                    _ => {
                        return Err(syn::Error::new(
                            f.sig.span(),
                            "an entry method takes `&mut self` (or `&self`) first; \
                             a suspendable one is `async fn name(this: Coro<Self>, ...)`",
                        ))
                    }
                }
                parse_args(f.sig.inputs.iter().skip(1))?
            };
            let mut args = args;
            for t in &mut args.types {
                ReplaceSelf(&self_path).visit_type_mut(t);
            }
            let output = match &f.sig.output {
                ReturnType::Default => quote!(()),
                ReturnType::Type(_, t) => {
                    let mut t = (**t).clone();
                    ReplaceSelf(&self_path).visit_type_mut(&mut t);
                    quote!(#t)
                }
            };
            entries.push(EntrySig {
                method: f.sig.ident.clone(),
                sig: args,
                output,
                docs: f
                    .attrs
                    .iter()
                    .filter(|a| a.path().is_ident("doc"))
                    .cloned()
                    .collect(),
                cfgs: cfg_attrs(&f.attrs)?,
                is_async,
                when,
            });
        }
    }
    let Some((ctor, ctor_is_async)) = ctor else {
        return Err(syn::Error::new(
            block.self_ty.span(),
            format!("a #[chare] impl needs a constructor `fn new([ctx: &Ctx<Self>,] args...) -> {type_name}`"),
        ));
    };
    // `<entry>_callback` is generated for every entry: no entry may be named so.
    for e in &entries {
        let name = e.method.to_string();
        if let Some(base) = name.strip_suffix("_callback") {
            if entries.iter().any(|o| o.method == base) {
                return Err(syn::Error::new(
                    e.method.span(),
                    format!(
                        "entry `{name}` has the name of the method `{name}` generated for entry \
                         `{base}` (its callback); rename one of the two entries"
                    ),
                ));
            }
        }
    }

    let migration = if migratable {
        let hook = if has_migrated_hook {
            quote! {
                fn migrated(&mut self, ctx: &::charmrs::Ctx<Self>) {
                    <#ty>::migrated(self, ctx)
                }
            }
        } else {
            quote!()
        };
        quote! {
            const MIGRATABLE: bool = true;
            fn pack(&self) -> ::std::result::Result<::std::vec::Vec<u8>, ::std::string::String> {
                ::charmrs::__private::pack_state(self)
            }
            fn unpack(bytes: &[u8]) -> ::std::result::Result<Self, ::std::string::String> {
                ::charmrs::__private::unpack_state(bytes)
            }
            #hook
        }
    } else {
        quote!()
    };
    let ctor_names = &ctor.names;
    let ctor_types = &ctor.types;
    // The generated code's own names are `__charmrs_*`: a user's argument may be called `ctx`,
    // `this`, `chare` or `init`.
    let ctor_ctx = if ctor.has_ctx {
        quote!(__charmrs_ctx,)
    } else {
        quote!()
    };
    let construct_body = if ctor_is_async {
        let ctx_arg = if ctor.has_ctx {
            quote!(::std::clone::Clone::clone(__charmrs_ctx),)
        } else {
            quote!()
        };
        quote!(::charmrs::Constructed::Pending(::std::boxed::Box::pin(<#ty>::new(#ctx_arg #(#ctor_names),*))))
    } else {
        quote!(::charmrs::Constructed::Ready(<#ty>::new(#ctor_ctx #(#ctor_names),*)))
    };
    let ctor_ctx_param = if ctor.has_ctx {
        quote!(__charmrs_ctx)
    } else {
        quote!(_)
    };
    let ctor_name = format!("{type_name}::new");

    let mut markers = Vec::new();
    let mut trait_methods = Vec::new();
    let mut impl_methods = Vec::new();
    let mut when_helpers = Vec::new();
    for EntrySig {
        method,
        sig,
        output,
        docs,
        cfgs,
        is_async,
        when,
    } in &entries
    {
        let marker = format_ident!("__charmrs_entry_{}_{}", type_ident, method);
        let names = &sig.names;
        let types = &sig.types;
        let entry_name = format!("{type_name}::{method}");
        let doc = format!(
            "Invokes entry method `{entry_name}` (asynchronously; on a collection proxy, on every element)."
        );
        let body = if *is_async {
            quote! {
                ::charmrs::Invoked::Suspended(::std::boxed::Box::pin(<#ty>::#method(__charmrs_this.clone(), #(#names),*)))
            }
        } else {
            let ctx_arg = if sig.has_ctx {
                quote!(__charmrs_ctx,)
            } else {
                quote!()
            };
            quote! {
                ::charmrs::Invoked::Done(__charmrs_this.with(|__charmrs_chare, __charmrs_ctx| {
                    let _ = __charmrs_ctx;
                    __charmrs_chare.#method(#ctx_arg #(#names),*)
                }))
            }
        };
        let when_items = match when {
            None => quote!(),
            Some((cond, cond_span)) => {
                let check = format_ident!("__charmrs_when_{}", method);
                let mut rewritten = cond.clone();
                DerefArgs(names).visit_expr_mut(&mut rewritten);
                when_helpers.push(quote! {
                    #(#cfgs)*
                    #[doc(hidden)]
                    // `unused_parens`: a condition in parentheses is how a user asks for a
                    // test per message instead of the equality index.
                    #[allow(unused_variables, unused_parens, clippy::all)]
                    fn #check(&self, args: &(#(#types,)*)) -> bool {
                        let (#(#names,)*) = args;
                        #rewritten
                    }
                });
                let keyed = equality_key(cond, names).map(|(field, k)| {
                    let state = format_ident!("__charmrs_when_key_{}", method);
                    let k = syn::Index {
                        index: k as u32,
                        span: *cond_span,
                    };
                    // Spanned on the condition (located there, resolved at the call site, so
                    // `args` is the parameter): a key type that is not `Hash` is reported there.
                    let state_hash =
                        quote_spanned!(*cond_span=> ::charmrs::__private::hash_key(&#field));
                    let arg_hash =
                        quote_spanned!(*cond_span=> ::charmrs::__private::hash_key(&args.#k));
                    when_helpers.push(quote! {
                        #(#cfgs)*
                        #[doc(hidden)]
                        fn #state(&self) -> u64 {
                            #state_hash
                        }
                    });
                    quote! {
                        fn arg_key(args: &Self::Args) -> ::std::option::Option<u64> {
                            ::std::option::Option::Some(#arg_hash)
                        }
                        fn state_key(chare: &#ty) -> u64 {
                            chare.#state()
                        }
                    }
                });
                quote! {
                    const CONDITIONAL: bool = true;
                    fn ready(chare: &#ty, args: &Self::Args) -> bool {
                        chare.#check(args)
                    }
                    #keyed
                }
            }
        };
        // One check per argument, spanned on its type: a type that is not `Payload` is reported
        // there (as well as where the generated code uses it).
        let payload_checks = types.iter().map(|t| {
            let check = quote_spanned!(t.span()=> __charmrs_payload::<#t>);
            quote! {
                #(#cfgs)*
                const _: () = {
                    fn __charmrs_payload<T: ::charmrs::Payload>() {}
                    let _ = #check;
                };
            }
        });
        markers.push(quote! {
            #(#payload_checks)*

            #(#cfgs)*
            #[doc = concat!("Marker of entry method `", #entry_name, "` (generated by #[chare]).")]
            #[doc(hidden)]
            #[allow(non_camel_case_types, unreachable_pub)]
            pub struct #marker;

            #(#cfgs)*
            impl ::charmrs::Entry<#ty> for #marker {
                type Args = (#(#types,)*);
                type Output = #output;
                const NAME: &'static str = #entry_name;
                const ID: u64 = ::charmrs::__private::entry_id(
                    concat!(module_path!(), "::", #entry_name));
                #[inline]
                fn call(__charmrs_this: &::charmrs::Coro<#ty>, __charmrs_args: Self::Args) -> ::charmrs::Invoked<#output> {
                    let (#(#names,)*) = __charmrs_args;
                    #body
                }
                #when_items
            }

            #(#cfgs)*
            ::charmrs::__private::inventory::submit! {
                ::charmrs::__private::EntryInfo {
                    id: <#marker as ::charmrs::Entry<#ty>>::ID,
                    name: #entry_name,
                    path: concat!(module_path!(), "::", #entry_name),
                    decoder: ::charmrs::__private::Decoder::Entry(
                        ::charmrs::__private::EntryCodec::of::<#ty, #marker>()),
                    callback: ::core::option::Option::Some(
                        ::charmrs::__private::CallbackMaker::of::<#ty, #marker>()),
                }
            }
        });
        trait_methods.push(quote! {
            #(#cfgs)*
            #[doc = #doc]
            #(#docs)*
            fn #method(&self, #(#names: #types),*) -> <Self as ::charmrs::ProxyTarget<#ty>>::Reply<#output>;
        });
        let callback = format_ident!("{}_callback", method);
        let callback_doc = format!(
            "Entry method `{entry_name}` of this proxy's element(s) as a callback (for example a reduction target)."
        );
        trait_methods.push(quote! {
            #(#cfgs)*
            #[doc = #callback_doc]
            fn #callback(&self) -> ::charmrs::Callback<(#(#types,)*)>;
        });
        impl_methods.push(quote! {
            #(#cfgs)*
            #[inline]
            fn #callback(&self) -> ::charmrs::Callback<(#(#types,)*)> {
                ::charmrs::Callback::new::<#ty, #marker>(::charmrs::ProxyTarget::<#ty>::callback_dest(self))
            }
        });
        impl_methods.push(quote! {
            #(#cfgs)*
            #[inline]
            fn #method(&self, #(#names: #types),*) -> <Self as ::charmrs::ProxyTarget<#ty>>::Reply<#output> {
                ::charmrs::ProxyTarget::<#ty>::send_entry::<#marker>(self, (#(#names,)*))
            }
        });
    }
    let trait_doc = format!(
        "Entry methods of `{type_name}`, callable on any proxy to it (generated by #[chare])."
    );

    Ok(quote! {
        #block

        impl #ty {
            #(#when_helpers)*
        }

        impl ::charmrs::Chare for #ty {
            type Init = (#(#ctor_types,)*);
            const NAME: &'static str = #type_name;
            const CTOR_ID: u64 = ::charmrs::__private::entry_id(concat!(module_path!(), "::", #ctor_name));
            const CHANNEL_ID: u64 = ::charmrs::__private::entry_id(
                concat!(module_path!(), "::", #type_name, "::<channel>"));
            fn construct(#ctor_ctx_param: &::charmrs::Ctx<Self>, __charmrs_init: Self::Init) -> ::charmrs::Constructed<Self> {
                let (#(#ctor_names,)*) = __charmrs_init;
                #construct_body
            }
            #migration
        }

        ::charmrs::__private::inventory::submit! {
            ::charmrs::__private::EntryInfo {
                id: <#ty as ::charmrs::Chare>::CTOR_ID,
                name: #ctor_name,
                path: concat!(module_path!(), "::", #ctor_name),
                decoder: ::charmrs::__private::Decoder::Constructor(
                    ::charmrs::__private::ConstructorCodec::of::<#ty>()),
                callback: ::core::option::Option::None,
            }
        }

        ::charmrs::__private::inventory::submit! {
            ::charmrs::__private::EntryInfo {
                id: <#ty as ::charmrs::Chare>::CHANNEL_ID,
                name: concat!(#type_name, "::<channel>"),
                path: concat!(module_path!(), "::", #type_name, "::<channel>"),
                decoder: ::charmrs::__private::Decoder::Entry(
                    ::charmrs::__private::EntryCodec::of::<#ty, ::charmrs::__private::ChannelDeliver>()),
                callback: ::core::option::Option::None,
            }
        }

        #(#markers)*

        #[doc = #trait_doc]
        #[allow(private_bounds, private_interfaces, unreachable_pub)]
        pub trait #proxy_trait: ::charmrs::ProxyTarget<#ty> {
            #(#trait_methods)*
        }

        impl<P: ::charmrs::ProxyTarget<#ty>> #proxy_trait for P {
            #(#impl_methods)*
        }
    })
}

/// Registers a function of one argument as a task the pool can run on any PE
/// (`charmrs::pool().map(f, items)`, `.task(f, arg)`, `.spawn(f, arg)`). The function may be
/// `async` (then its tasks may await nested tasks). Argument and result must be
/// `charmrs::Payload`; several arguments go as one tuple.
///
/// Pass the function to the pool by its name (`pool().map(square, items)`): the pool finds the
/// registration from the function's own type, so a closure or a function pointer (`square as
/// fn(u64) -> u64`) is refused at run time with a message saying so. Not generic.
///
/// ```ignore
/// #[charmrs::task]
/// fn square(x: u64) -> u64 { x * x }
///
/// // In an async context on a PE:
/// let squares = charmrs::pool().map(square, vec![1, 2, 3]).await;   // vec![1, 4, 9]
/// ```
///
/// (`charmrs::Pool` has this example runnable.)
#[proc_macro_attribute]
pub fn task(attr: TokenStream, item: TokenStream) -> TokenStream {
    if !attr.is_empty() {
        return syn::Error::new(Span::call_site(), "#[task] takes no arguments")
            .to_compile_error()
            .into();
    }
    let f = parse_macro_input!(item as syn::ItemFn);
    match expand_task(&f) {
        Ok(ts) => ts.into(),
        Err(e) => e.to_compile_error().into(),
    }
}

fn expand_task(f: &syn::ItemFn) -> syn::Result<TokenStream2> {
    if !f.sig.generics.params.is_empty() {
        return Err(syn::Error::new(
            f.sig.generics.span(),
            "task functions cannot be generic",
        ));
    }
    if f.sig.inputs.len() != 1 {
        return Err(syn::Error::new(
            f.sig.inputs.span(),
            "a task function takes exactly one argument (use a tuple for several)",
        ));
    }
    let FnArg::Typed(arg) = &f.sig.inputs[0] else {
        return Err(syn::Error::new(
            f.sig.inputs.span(),
            "a task function takes no `self`",
        ));
    };
    let arg_ty = &arg.ty;
    let ret_ty = match &f.sig.output {
        ReturnType::Default => quote!(()),
        ReturnType::Type(_, t) => quote!(#t),
    };
    let name = &f.sig.ident;
    let is_async = f.sig.asyncness.is_some();
    let run = if is_async {
        quote! {
            ::charmrs::__private::TaskRun::Suspended(::std::boxed::Box::pin(async move {
                ::std::boxed::Box::new(#name(arg).await)
                    as ::std::boxed::Box<dyn ::std::any::Any + ::std::marker::Send>
            }))
        }
    } else {
        quote!(::charmrs::__private::TaskRun::Done(::std::boxed::Box::new(#name(arg))))
    };
    Ok(quote! {
        #f

        const _: () = {
            fn run(
                arg: ::std::boxed::Box<dyn ::std::any::Any + ::std::marker::Send>,
            ) -> ::charmrs::__private::TaskRun {
                let arg: #arg_ty = *arg
                    .downcast::<#arg_ty>()
                    .expect("the pool passes the argument type the function was registered with");
                #run
            }
            fn type_name() -> &'static str {
                ::std::any::type_name_of_val(&#name)
            }
            ::charmrs::__private::inventory::submit! {
                ::charmrs::__private::TaskInfo {
                    name: concat!(module_path!(), "::", stringify!(#name)),
                    type_name: type_name,
                    run,
                    is_async: #is_async,
                    encode_arg: ::charmrs::__private::encode_value::<#arg_ty>,
                    decode_arg: ::charmrs::__private::decode_any::<#arg_ty>,
                    encode_result: ::charmrs::__private::encode_value::<#ret_ty>,
                }
            }
        };
    })
}
