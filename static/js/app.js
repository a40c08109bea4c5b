// webchat client: reconnect with replay, no duplicates, Enter to send, typing hints, local times.
(function () {
  "use strict";
  var live = null;        // the element carrying ws-connect
  var socket = null;      // htmx ws wrapper (publicInterface)

  // htmx opens the socket on DOMContentLoaded before this file's own handler has run: these
  // look #live up rather than rely on `live` being set.
  function liveElement() { return live || document.getElementById("live"); }

  // The conversation this page has open (null on the list and other pages).
  function openCid() {
    var el = liveElement();
    return el && el.getAttribute("data-conversation-id");
  }

  function newestId() {
    var el = liveElement();
    var n = el ? parseInt(el.getAttribute("data-newest") || "0", 10) : 0;
    document.querySelectorAll("[data-mid]").forEach(function (el) {
      var m = parseInt(el.getAttribute("data-mid"), 10);
      if (m > n) n = m;
    });
    document.querySelectorAll("[data-last-mid]").forEach(function (el) {
      var m = parseInt(el.getAttribute("data-last-mid"), 10);
      if (m > n) n = m;
    });
    return n;
  }

  // Every (re)connect asks for what happened after the newest message this page has.
  htmx.createWebSocket = function (url) {
    var sep = url.indexOf("?") >= 0 ? "&" : "?";
    return new WebSocket(url + sep + "after=" + newestId());
  };

  function updateTitle() {
    var title = document.querySelector("title");
    if (!title) return;
    var total = 0;
    document.querySelectorAll("#conversation-list .badge").forEach(function (b) {
      total += parseInt(b.textContent || "0", 10) || 0;
    });
    var base = title.getAttribute("data-base") || "webchat";
    document.title = (total ? "(" + total + ") " : "") + base;
  }

  // Times in the page's language; the browser's own conventions when it speaks that language
  // (an English page keeps a British or American browser's clock).
  function timeLocales() {
    var page = document.documentElement.lang || "", browser = navigator.language || "";
    return page && browser.split("-")[0] !== page.split("-")[0] ? [page] : [];
  }

  function formatTimes(root) {
    var now = new Date(), locales = timeLocales();
    (root || document).querySelectorAll("time[data-fmt]").forEach(function (t) {
      var v = t.getAttribute("datetime");
      if (!v) return;
      var d = new Date(v);
      if (isNaN(d)) return;
      var hm = d.toLocaleTimeString(locales, { hour: "2-digit", minute: "2-digit" });
      if (t.getAttribute("data-fmt") === "time") { t.textContent = hm; return; }
      var days = Math.floor((new Date(now.toDateString()) - new Date(d.toDateString())) / 86400000);
      if (days === 0) t.textContent = hm;
      else if (days < 7) t.textContent = d.toLocaleDateString(locales, { weekday: "short" });
      else t.textContent = d.toLocaleDateString(locales);
    });
  }

  // Whether the reader is at the newest message: measured before something is added (a tall
  // message or an image would otherwise push the bottom out of reach of any threshold).
  var atBottom = true;
  function nearBottom(box) { return box.scrollHeight - box.scrollTop - box.clientHeight < 160; }

  function scrollToBottom(force) {
    var box = document.querySelector(".messages");
    if (!box) return;
    if (force || atBottom || nearBottom(box)) box.scrollTop = box.scrollHeight;
    atBottom = nearBottom(box);
  }

  document.addEventListener("scroll", function (evt) {
    if (evt.target.classList && evt.target.classList.contains("messages")) atBottom = nearBottom(evt.target);
  }, true);
  // An image that finishes loading grows its message: keep a reader who was at the bottom there.
  document.addEventListener("load", function (evt) {
    var img = evt.target;
    if (img.tagName === "IMG" && img.closest && img.closest(".messages") && atBottom) scrollToBottom(true);
  }, true);

  function markActive() {
    var cid = openCid();
    document.querySelectorAll(".conv-row").forEach(function (r) {
      r.classList.toggle("active", r.getAttribute("data-cid") === cid);
    });
    if (cid) { var b = document.getElementById("unread-" + cid); if (b) { b.textContent = ""; b.hidden = true; } }
  }

  // Before an out-of-band swap: a message already on the page is never added twice, and an
  // updated conversation row replaces the old one at the top of the list.
  // The list's "no conversations yet" note goes once a row is there.
  function dropEmptyNote() {
    var empty = document.getElementById("empty-list");
    if (empty) empty.remove();
  }

  // After a system line (created, added, removed, left, renamed) or a refresh (someone's account
  // was deleted), the open conversation is read again: its header (name, members, owner's
  // controls) is replaced, or, when it no longer exists for this user, the page says so.
  var headTimer = null;
  function recheckOpen() {
    var cid = openCid();
    if (!cid || !document.querySelector(".chat-head")) return;
    clearTimeout(headTimer);
    // Spread out: every member with the group open asks at once otherwise.
    headTimer = setTimeout(function () {
      fetch("/conversations/" + cid + "?part=head", { credentials: "same-origin", headers: { "HX-Request": "true" } })
        .then(function (response) {
          var gone = document.getElementById("gone-" + cid);
          if (response.status === 404 && gone && !gone.textContent) {
            gone.className = "gone";
            gone.textContent = gone.getAttribute("data-text") || "";
            return null;
          }
          return response.ok ? response.text() : null;
        }).then(function (html) {
          var head = document.querySelector(".chat-head");
          if (!html || !head) return;
          // Not while someone is using it (the menu open, a field being typed in): later. A
          // focused button (the menu's, closed) is no reason to wait: its focus is moved over.
          var focused = document.activeElement;
          if (head.querySelector("details[open]") ||
              (head.contains(focused) && focused.matches("input, textarea, select"))) {
            setTimeout(recheckOpen, 2000);
            return;
          }
          var fresh = new DOMParser().parseFromString(html, "text/html").querySelector(".chat-head");
          if (!fresh) return;
          var refocus = head.contains(focused) && focused.closest("#chat-menu") ? "#chat-menu summary" : null;
          head.replaceWith(fresh);
          htmx.process(fresh);
          markSharedNames();  // the members may have changed
          if (refocus && fresh.querySelector(refocus)) fresh.querySelector(refocus).focus();
          var title = document.querySelector("title");
          if (title && fresh.getAttribute("data-title")) {
            title.setAttribute("data-base", fresh.getAttribute("data-title"));
            updateTitle();
          }
        }).catch(function () {});
    }, 100 + Math.random() * 900);
  }

  // Look-alike nicknames: a sender whose nickname compares equal (services.text_rules.name_key)
  // to another member's or sender's shows their @username beside it, as the server does in the
  // messages it renders (services.people.name_labels); every sender's @username is the title of
  // their name. The server gives the keys: the header's members (data-people) and each message's
  // sender (data-name-key: the name it was sent under, so a member who renamed themselves to
  // look like another is caught in the message that arrives live).
  function markSharedNames() {
    var head = document.querySelector(".chat-head[data-people]"), pane = document.querySelector(".messages");
    if (!head || !pane) return;
    var people;
    try { people = JSON.parse(head.getAttribute("data-people")) || {}; } catch (e) { return; }
    var owners = {};
    function own(key, id) { (owners[key] = owners[key] || {})[id] = true; }
    Object.keys(people).forEach(function (id) { own(people[id][1], id); });
    var names = pane.querySelectorAll(".msg[data-sender] .sender[data-name-key]");
    function senderOf(el) { return el.closest(".msg").getAttribute("data-sender"); }
    names.forEach(function (el) { own(el.getAttribute("data-name-key"), senderOf(el)); });
    names.forEach(function (el) {
      var person = people[senderOf(el)];
      var username = person ? person[0] : (el.getAttribute("title") || "").replace(/^@/, "");
      if (!username) return;
      if (!el.hasAttribute("title")) el.setAttribute("title", "@" + username);
      var next = el.nextElementSibling;
      if (next && next.classList.contains("handle")) return;  // once named, always named
      if (Object.keys(owners[el.getAttribute("data-name-key")] || {}).length < 2) return;
      var handle = document.createElement("span");
      handle.className = "handle";
      handle.textContent = "@" + username;
      el.after(" ", handle);
    });
  }

  // A socket frame carries a new message for its chat pane and the member's list row. A page
  // without that pane (the list, another chat) has nowhere to put the message: the part is
  // dropped here, before htmx would report each such message as a missing target.
  function oobTarget(el) {
    var spec = el.getAttribute("hx-swap-oob") || "";
    var colon = spec.indexOf(":");
    if (colon < 0) return el.id ? document.getElementById(el.id) : null;  // "true", or a strategy: by id
    try { return document.querySelector(spec.slice(colon + 1)); } catch (e) { return null; }
  }

  htmx.defineExtension("wc-frames", {
    transformResponse: function (text) {
      if (text.indexOf("hx-swap-oob") < 0) return text;
      var tpl = document.createElement("template");
      tpl.innerHTML = text;
      var parts = Array.prototype.slice.call(tpl.content.children);
      var homeless = parts.filter(function (el) { return el.hasAttribute("hx-swap-oob") && !oobTarget(el); });
      if (!homeless.length) return text;
      homeless.forEach(function (el) { el.remove(); });
      return tpl.innerHTML;
    }
  });

  // A message older than the newest shown (one that committed late, or the replay's look back)
  // goes in its place by id; one older than everything shown belongs to the history that
  // "Load older messages" brings, and is left to it.
  function placeByAge(pane, el) {
    var mid = parseInt(el.getAttribute("data-mid") || "0", 10);
    var shown = pane.querySelectorAll(":scope > [data-mid]");
    if (!mid || !shown.length || mid > parseInt(shown[shown.length - 1].getAttribute("data-mid"), 10)) return false;
    if (mid < parseInt(shown[0].getAttribute("data-mid"), 10) && pane.querySelector("#load-older")) {
      el.remove();
      return true;
    }
    for (var i = 0; i < shown.length; i++) {
      if (parseInt(shown[i].getAttribute("data-mid"), 10) > mid) {
        shown[i].before(el);
        htmx.process(el);
        formatTimes(el);
        return true;
      }
    }
    return false;
  }

  document.addEventListener("htmx:oobBeforeSwap", function (evt) {
    var frag = evt.detail.fragment, pane = evt.detail.target;
    if (!frag || !frag.querySelectorAll) return;
    var open = openCid();
    frag.querySelectorAll("[id^='message-']").forEach(function (el) {
      if (document.getElementById(el.id)) { el.remove(); return; }
      // Their message is here: "… is typing" is over.
      var typing = pane && pane.id && document.getElementById(pane.id.replace("messages-", "typing-"));
      if (typing && typing.textContent && typing.getAttribute("data-uid") === el.getAttribute("data-sender")) {
        clearTimeout(typing._clear);
        typing.textContent = "";
      }
      var inPane = pane && pane.id && pane.id.indexOf("messages-") === 0;
      if (inPane && open && pane.id === "messages-" + open && el.classList.contains("system")) recheckOpen();
      if (inPane) placeByAge(pane, el);
    });
    frag.querySelectorAll(".conv-row[id^='conversation-']").forEach(function (el) {
      var old = document.getElementById(el.id);
      if (old) old.remove();
      dropEmptyNote();
    });
  });

  // Keep the list in the server's order (last activity, then id, newest first) and each
  // conversation once: pushed and replayed rows arrive at the top in arrival order, and a
  // later page of the list may hold a row that was pushed meanwhile.
  function orderRows() {
    var list = document.getElementById("conversation-list");
    if (!list) return;
    var rows = Array.prototype.slice.call(list.querySelectorAll(":scope > .conv-row"));
    var seen = {};
    rows = rows.filter(function (r) {
      if (seen[r.id]) { r.remove(); return false; }
      seen[r.id] = true;
      return true;
    });
    function key(r) {
      return [parseInt(r.getAttribute("data-sort") || "0", 10), parseInt(r.getAttribute("data-cid") || "0", 10)];
    }
    var sorted = rows.slice().sort(function (a, b) {
      var ka = key(a), kb = key(b);
      return (kb[0] - ka[0]) || (kb[1] - ka[1]);
    });
    if (sorted.some(function (r, i) { return r !== rows[i]; })) {
      var more = document.getElementById("conversation-list-more");
      sorted.forEach(function (r) { list.insertBefore(r, more); });
    }
  }

  // The chat page fetches its list after it is shown (the placeholder carries data-loading).
  // Rows pushed or replayed before the answer came are in the placeholder; each is kept when
  // it is newer than the answer's row (a higher data-last-mid) or the answer lacks it.
  var early = null;
  document.addEventListener("htmx:beforeSwap", function (evt) {
    var target = evt.detail.target;
    if (target && target.id === "conversation-list" && target.hasAttribute("data-loading")) {
      early = Array.prototype.slice.call(target.querySelectorAll(":scope > .conv-row"));
    }
  });

  function keepEarlyRows() {
    var rows = early, list = document.getElementById("conversation-list");
    early = null;
    if (!rows || !list) return;
    function lastMid(r) { return parseInt(r.getAttribute("data-last-mid") || "0", 10); }
    rows.forEach(function (r) {
      var answer = document.getElementById(r.id);
      if (!answer) list.insertBefore(r, list.firstChild);
      else if (lastMid(r) > lastMid(answer)) answer.replaceWith(r);
    });
    if (rows.length) dropEmptyNote();
    formatTimes(list);
    orderRows();
    markActive();
    updateTitle();
  }

  document.addEventListener("htmx:afterSwap", function (evt) {
    orderRows();
    updateTitle();
    if (evt.detail.elt && evt.detail.elt.id === "load-older") markSharedNames();  // older messages
    var target = evt.detail && evt.detail.target;
    formatTimes(target && target.isConnected ? target : document);  // replaced whole (outerHTML): the page
  });
  // After settling: htmx gives an element whose id was already on the page (a row pushed into
  // the placeholder) its server attributes back only when it settles, which would undo the
  // merge's choices and the active row's class if they were made at swap time.
  document.addEventListener("htmx:afterSettle", function () { keepEarlyRows(); });

  document.addEventListener("htmx:oobAfterSwap", function (evt) {
    orderRows();
    var into = evt.detail.target;
    if (into && into.classList && into.classList.contains("messages")) markSharedNames();  // arrived live
    formatTimes(evt.detail.target);
    markActive();
    updateTitle();
    scrollToBottom(false);
    var t = evt.target;  // the element just swapped in
    if (t && t.getAttribute && t.getAttribute("data-typing")) {
      clearTimeout(t._clear);
      t._clear = setTimeout(function () { t.textContent = ""; }, 4000);
    }
    if (t && t.id === "ws-reload") {
      // Too much was missed to stream: the page itself is the fastest way to catch up.
      window.location.reload();
      return;
    }
    if (t && t.id === "ws-refresh") {
      htmx.ajax("GET", "/conversations", { target: "#conversation-list", swap: "outerHTML", select: "#conversation-list" });
      recheckOpen();
    }
  });

  document.addEventListener("htmx:wsOpen", function (evt) {
    socket = evt.detail.socketWrapper;
    var cid = openCid();
    if (cid) socket.send(JSON.stringify({ type: "join", conversation_id: parseInt(cid, 10) }));
    document.body.classList.remove("offline");
  });
  var leaving = false;
  window.addEventListener("beforeunload", function () { leaving = true; });
  document.addEventListener("htmx:wsClose", function (evt) {
    document.body.classList.add("offline");
    // Signed out elsewhere, disabled or deleted (1008): reload to reach the sign-in page,
    // unless this page is already navigating away (its own sign-out form, say).
    if (evt.detail.event && evt.detail.event.code === 1008 && !leaving) {
      setTimeout(function () { if (!leaving) window.location.reload(); }, 300);
    }
  });

  // New group: someone ticked in the search results joins the members list, so the next search
  // (which replaces the results) does not drop them.
  document.addEventListener("change", function (evt) {
    var box = evt.target;
    if (!box.matches || !box.matches("#group-search-results input[name=member_ids]") || !box.checked) return;
    var members = document.querySelector("#group-form .user-results"), item = box.closest("li");
    if (!members || !item) return;
    var same = members.querySelector("input[name=member_ids][value='" + box.value + "']");
    if (same) { same.checked = true; item.remove(); return; }
    var hint = members.querySelector("li.muted");
    if (hint) hint.remove();
    members.appendChild(item);
  });

  // Forms that ask first (data-confirm): asked here, as no inline handler (onsubmit) may run under
  // the Content-Security-Policy. Before htmx or anything else hears of the submit.
  document.addEventListener("submit", function (evt) {
    var form = evt.target;
    if (!form.matches || !form.matches("form[data-confirm]")) return;
    if (!window.confirm(form.getAttribute("data-confirm"))) {
      evt.preventDefault();
      evt.stopImmediatePropagation();
    }
  }, true);

  function freshClientId(form) {
    var input = form.querySelector("#compose-client-id");
    if (input && !input.value) {
      input.value = (window.crypto && crypto.randomUUID) ? crypto.randomUUID()
        : String(Date.now()) + Math.random().toString(16).slice(2);
    }
  }

  document.addEventListener("submit", function (evt) {
    if (evt.target.id === "compose-form") freshClientId(evt.target);
  }, true);

  // A message keeps its client_id until it is sent, so a retry after a failure is recognised as
  // the same message; different text (typed since, put together after a failure) gets a new one.
  document.addEventListener("htmx:configRequest", function (evt) {
    var form = evt.detail.elt, params = evt.detail.parameters;
    if (!form || form.id !== "compose-form") return;
    var input = form.querySelector("#compose-client-id"), body = (params.get ? params.get("body") : params.body) || "";
    if (input.value && form._idFor !== body) input.value = "";
    freshClientId(form);
    form._idFor = body;
    if (params.set) params.set("client_id", input.value); else params.client_id = input.value;
  });

  // The box empties as soon as a message leaves, so what is typed meanwhile is kept; a send
  // that fails puts its text back in front of it.
  document.addEventListener("htmx:beforeSend", function (evt) {
    var form = evt.detail.elt;
    if (!form || form.id !== "compose-form") return;
    var box = form.querySelector("#compose-body");
    form._sending = box.value;
    box.value = "";
  });

  // Nothing to send (the Send button pressed twice, an empty box): no request, no error.
  document.addEventListener("htmx:beforeRequest", function (evt) {
    var form = evt.detail.elt;
    if (!form || form.id !== "compose-form") return;
    if (!form.querySelector("#compose-body").value.trim() && !form.querySelector("#compose-image").files.length) {
      evt.preventDefault();
    }
  });

  // The attached image shows by name, with a button that takes it off again.
  function showAttachment(form) {
    var input = form.querySelector("#compose-image"), chip = form.querySelector("#compose-file");
    if (!input || !chip) return;
    var file = input.files.length ? input.files[0] : null;
    chip.hidden = !file;
    chip.querySelector(".compose-file-name").textContent = file ? file.name : "";
  }

  function dropAttachment(form) {
    var input = form.querySelector("#compose-image");
    if (input) input.value = "";
    showAttachment(form);
  }

  document.addEventListener("change", function (evt) {
    if (evt.target.id === "compose-image") showAttachment(evt.target.form);
  });
  document.addEventListener("click", function (evt) {
    var remove = evt.target.closest && evt.target.closest("#compose-file-remove");
    if (!remove) return;
    dropAttachment(remove.form);
    remove.form.querySelector("#compose-body").focus();
  });

  document.addEventListener("htmx:afterRequest", function (evt) {
    var form = evt.detail.elt;
    if (!form || form.id !== "compose-form") return;
    var box = form.querySelector("#compose-body"), sent = form._sending || "";
    var status = evt.detail.xhr ? evt.detail.xhr.status : 0;
    form._sending = null;
    if (evt.detail.successful) {
      dropAttachment(form);
      form.querySelector("#compose-client-id").value = "";
      var flash = document.getElementById("flash"); if (flash) flash.innerHTML = "";
      scrollToBottom(true);
      return;
    }
    if (sent) box.value = box.value ? sent + "\n" + box.value : sent;
    // Too large for the server to read at all: that can only be the image.
    if (status === 413) dropAttachment(form);
  });

  // An image the server would not take would block every later message: it comes off (the
  // answer's error says why). Other refusals (an expired form, too many sends) keep it.
  document.addEventListener("image-refused", function (evt) {
    var form = evt.target.closest ? evt.target.closest("#compose-form") : null;
    if (form) dropAttachment(form);
  });

  // The request never reached the server: say so (the text is back in the box, the image kept).
  document.addEventListener("htmx:sendError", function (evt) {
    var form = evt.detail.elt, flash = document.getElementById("flash");
    if (!form || form.id !== "compose-form" || !flash) return;
    flash.innerHTML = "";
    var note = document.createElement("p");
    note.className = "error";
    note.setAttribute("role", "alert");
    note.textContent = form.getAttribute("data-offline-text") || "";
    flash.appendChild(note);
  });

  // On a touch screen Enter starts a new line (there is no Shift to hold); the button sends.
  var touchOnly = window.matchMedia && window.matchMedia("(hover: none) and (pointer: coarse)").matches;

  var lastTyping = 0;
  document.addEventListener("keydown", function (evt) {
    if (evt.target.id !== "compose-body") return;
    if (evt.key === "Enter" && !evt.shiftKey && !evt.isComposing && !touchOnly) {
      evt.preventDefault();
      var form = evt.target.form;
      if (evt.target.value.trim() || form.querySelector("#compose-image").files.length) form.requestSubmit();
      return;
    }
    var now = Date.now();
    if (socket && now - lastTyping > 2500) {
      lastTyping = now;
      var cid = openCid();
      if (cid) socket.send(JSON.stringify({ type: "typing", conversation_id: parseInt(cid, 10) }));
    }
  });

  // Scrolling to the top of a conversation loads the older messages, and the one that was at
  // the top stays where it was.
  var keepTop = null;
  function rise(el, pane) { return el.getBoundingClientRect().top - pane.getBoundingClientRect().top; }
  document.addEventListener("scroll", function (evt) {
    var pane = evt.target;
    if (!pane.classList || !pane.classList.contains("messages") || pane.scrollTop > 80) return;
    var more = pane.querySelector("#load-older");
    if (more && !more.classList.contains("htmx-request")) htmx.trigger(more, "click");
  }, true);
  // The first message shown before the older ones arrive stays at the same height on screen.
  function restoreTop() {
    if (!keepTop) return;
    keepTop.pane.scrollTop += rise(keepTop.first, keepTop.pane) - keepTop.offset;
    keepTop = null;
  }
  document.addEventListener("htmx:beforeSwap", function (evt) {
    if (!evt.detail.elt || evt.detail.elt.id !== "load-older") return;
    var pane = evt.detail.elt.closest(".messages"), first = pane && pane.querySelector(":scope > [data-mid]");
    keepTop = first ? { pane: pane, first: first, offset: rise(first, pane) } : null;
    // The link that asked is swapped out; when the answer brings no new one (the oldest page),
    // afterSwap is not heard here: restore after the swap either way.
    setTimeout(restoreTop, 0);
  });
  document.addEventListener("htmx:afterSwap", function (evt) {
    if (evt.detail.elt && evt.detail.elt.id === "load-older") restoreTop();
  });

  // A menu (details.menu) closes with Escape or a click elsewhere, as menus do.
  function closeMenus(except) {
    document.querySelectorAll("details.menu[open]").forEach(function (menu) {
      if (menu !== except) menu.open = false;
    });
  }
  document.addEventListener("click", function (evt) {
    if (!evt.isTrusted) return;  // a click the page makes itself (loading older messages) is not the user's
    closeMenus(evt.target.closest ? evt.target.closest("details.menu") : null);
  });
  document.addEventListener("keydown", function (evt) {
    if (evt.key !== "Escape" || evt.isComposing) return;
    var open = document.querySelector("details.menu[open]");
    if (!open) return;
    closeMenus(null);
    var summary = open.querySelector("summary");
    if (summary) summary.focus();
  });

  document.addEventListener("DOMContentLoaded", function () {
    live = document.getElementById("live");
    formatTimes(document);
    markSharedNames();
    markActive();
    updateTitle();
    scrollToBottom(true);
    // A conversation opened with a keyboard and mouse is ready to type in (not on a phone,
    // where focusing would pop the keyboard up over the messages).
    var box = document.getElementById("compose-body");
    if (box && !touchOnly) box.setAttribute("aria-describedby", "compose-hint");  // where Enter sends
    var focused = document.activeElement;
    if (box && !touchOnly && !(focused && focused.closest && focused.closest("form"))) box.focus({ preventScroll: true });
  });
})();
