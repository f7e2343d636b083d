// Stands in for Koala's SDK in the demo, which runs without internet. Like the real pixel
// it gives the browser a ko_id cookie (a UUID v4) on its first visit; then it shows in the
// browser console what the page queued for Koala (ko.identify, ko.reset).
(function () {
  var hasCookie = document.cookie.split("; ").some(function (c) {
    return c.indexOf("ko_id=") === 0;
  });
  if (!hasCookie) {
    document.cookie = "ko_id=" + crypto.randomUUID() + "; path=/; max-age=31536000; samesite=lax";
  }
  var queue = Array.isArray(window.ko) ? window.ko : [];
  queue.forEach(function (call) {
    console.log("Koala stand-in SDK received", call);
  });
})();
