// TRuST tab: progress through the web UI's own progress API (like textual inversion training), the live loss /
// forget-score curves (the run's live preview, drawn over the curves image), Bake, concept saliency, Verify, and
// "send to txt2img".

function trust_start() {
    gradioApp().querySelector('#trust_error').innerHTML = '';
    var id = randomId();
    requestProgress(id, gradioApp().getElementById('trust_output'), gradioApp().getElementById('trust_curves'),
        function() {}, function(progress) {
            gradioApp().getElementById('trust_progress').innerHTML = progress.textinfo || '';
        });
    var res = Array.from(arguments);
    res[0] = id;
    return res;
}

function trust_bake_start() {
    gradioApp().querySelector('#trust_bake_error').innerHTML = '';
    var id = randomId();
    requestProgress(id, gradioApp().getElementById('trust_bake_error'), null, function() {});
    var res = Array.from(arguments);
    res[0] = id;
    return res;
}

// Find concept neurons and Verify: the web UI's progress bar above the panel's error box, the stage in the text line
function trust_panel_start(prefix, args) {
    gradioApp().querySelector('#' + prefix + '_error').innerHTML = '';
    var id = randomId();
    requestProgress(id, gradioApp().getElementById(prefix + '_error'), null, function() {}, function(progress) {
        gradioApp().getElementById('trust_progress').innerHTML = progress.textinfo || '';
    });
    var res = Array.from(args);
    res[0] = id;
    return res;
}

function trust_saliency_start() {
    return trust_panel_start('trust_saliency', arguments);
}

function trust_verify_start() {
    return trust_panel_start('trust_verify', arguments);
}

function trust_send_to_txt2img(tag) {
    var prompt = gradioApp().querySelector('#txt2img_prompt textarea');
    if (prompt && tag) {
        prompt.value = prompt.value ? prompt.value + ' ' + tag : tag;
        updateInput(prompt);
        switch_to_txt2img();
    }
    return [];
}
