// studioserve sign-in: with token auth on, a browser cannot send the bearer header when it
// navigates to the status page, so this page asks for the token, keeps it in the tab's
// sessionStorage, fetches the real page with the header and shows it. status.js then sends the
// same header on every poll. A "#token=..." fragment works too: browsers never send fragments
// to the server, and this script removes it from the address bar and the tab's history entry.
(function () {
  "use strict";
  var KEY = "studioserve-token";
  // storage can be unavailable (privacy settings): then the token lasts for this page only
  function store(method, value) {
    try { return sessionStorage[method](KEY, value); } catch (e) { return null; }
  }

  function fail(message) {
    var p = document.getElementById("sign-in-error");
    if (p) { p.textContent = message; }
    document.body.setAttribute("data-sign-in", "failed");
  }

  function show(token) {
    fetch("./", {
      headers: { Accept: "text/html", Authorization: "Bearer " + token },
      cache: "no-store",
      credentials: "omit",
    })
      .then(function (r) {
        if (r.status === 401) {
          store("removeItem");
          throw new Error("wrong token: the server refused it");
        }
        if (!r.ok) { throw new Error("HTTP " + r.status); }
        return r.text();
      })
      .then(function (html) {
        store("setItem", token);
        window.studioserveToken = token;  // for status.js where storage is unavailable
        document.open();
        document.write(html);
        document.close();
      })
      .catch(function (e) { fail(e.message); });
  }

  var m = /(?:^#|&)token=([^&]+)/.exec(location.hash);
  if (m) {
    history.replaceState(null, "", location.pathname + location.search);
    show(decodeURIComponent(m[1]));
  } else if (store("getItem")) {
    show(store("getItem"));
  }
  document.getElementById("sign-in").addEventListener("submit", function (ev) {
    ev.preventDefault();
    var t = document.getElementById("token").value.trim();
    if (t) { show(t); }
  });
})();
